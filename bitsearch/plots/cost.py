"""Bar figure of the cost of each stage of the pipeline as a multiple of one forward+backward pass,
one bar per configuration (model shape, tokens)."""

from __future__ import annotations

__all__ = ["plot_stage_costs"]


def plot_stage_costs(ratios: dict[tuple[str, str], float], out: str, title: str = "") -> str:
    """Grouped bars (log scale) of ``ratios[(stage, configuration)]``, the time of a stage as a
    multiple of one forward+backward pass: stages along x in their first-seen order, one bar
    colour per configuration, a dashed line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_path
    from ..errors import BitsearchError

    if not ratios:
        raise BitsearchError("no stage costs to plot")
    stages = list(dict.fromkeys(s for s, _ in ratios))
    groups = list(dict.fromkeys(g for _, g in ratios))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(stages) * max(1, len(groups) / 2)), 5))
    x = np.arange(len(stages))
    for k, g in enumerate(groups):
        ax.bar(x - 0.4 + width * (k + 0.5), [ratios.get((s, g), np.nan) for s in stages], width, label=g)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(stages, rotation=45, ha="right")
    ax.set_ylabel("stage time / one forward+backward pass")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
