"""Bar figure of measured runs: the perplexity of each run of a plan (e.g. one finalizer setting
each), one panel per plan."""

from __future__ import annotations

from typing import Callable

__all__ = ["plot_runs"]


def plot_runs(
    runs: list[dict],
    out: str,
    baseline: str | None = None,
    color_of: Callable[[str], str] | None = None,
    xlabel: str = "perplexity (lower is better)",
) -> str:
    """One panel per ``plan`` of ``runs`` (dicts with ``plan``, ``run``, ``ppl``, ``avg_bits``): a
    horizontal bar per run in their order, the run named ``baseline`` grey with a dashed line at
    its perplexity; ``color_of(run)`` colours the others (default: blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path
    from ..errors import BitsearchError

    if not runs:
        raise BitsearchError("no runs to plot")
    plans = list(dict.fromkeys(r["plan"] for r in runs))
    fig, axes = plt.subplots(1, len(plans), figsize=(6 * len(plans), 4.5), squeeze=False)
    for ax, name in zip(axes[0], plans):
        d = [r for r in runs if r["plan"] == name]
        colors = ["0.5" if r["run"] == baseline else (color_of(r["run"]) if color_of else "tab:blue") for r in d]
        ax.barh([r["run"] for r in d], [r["ppl"] for r in d], color=colors)
        base = [r["ppl"] for r in d if r["run"] == baseline]
        if base:
            ax.axvline(float(base[0]), color="0.3", lw=0.8, ls="--")
        ppl = [r["ppl"] for r in d]
        ax.set_xlim(min(ppl) * 0.97, max(ppl) * 1.01)
        ax.set_title(f"{name} ({d[0]['avg_bits']:.2f} avg bits)")
        ax.set_xlabel(xlabel)
        ax.invert_yaxis()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
