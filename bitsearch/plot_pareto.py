"""The trade-off of an optuna search study: every trial, its (KL, size) front, the budget and,
when measured, uniform round-to-nearest points — one PNG."""

from __future__ import annotations

__all__ = ["plot_pareto"]


def plot_pareto(rows: list[dict], out: str, budget_bits: float | None = None,
                uniform: list[dict] | None = None, title: str = "") -> str:
    """``rows``: trials as from ``search.optuna_study.pareto_rows`` (avg_bits, kl, on_front);
    ``uniform``: [{"label", "avg_bits", "kl"}] measured the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path
    from .errors import BitsearchError

    if not rows:
        raise BitsearchError("the study has no finished trial to plot")
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    ax.scatter([r["avg_bits"] for r in rows], [r["kl"] for r in rows], s=14, color="tab:blue", alpha=0.35,
               label=f"trials ({len(rows)})")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["avg_bits"])
    ax.plot([r["avg_bits"] for r in front], [r["kl"] for r in front], "o-", color="tab:blue",
            label=f"front ({len(front)})")
    inside = [r for r in rows if r.get("within_budget", True)]
    if inside:
        best = min(inside, key=lambda r: r["kl"])
        ax.scatter([best["avg_bits"]], [best["kl"]], s=90, facecolors="none", edgecolors="tab:red", lw=1.5,
                   label=f"chosen: trial {best['trial']}", zorder=5)
    for u in uniform or []:
        ax.scatter([u["avg_bits"]], [u["kl"]], marker="s", color="tab:gray", zorder=4)
        ax.annotate(u["label"], (u["avg_bits"], u["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if uniform:
        ax.scatter([], [], marker="s", color="tab:gray", label="uniform RTN")
    if budget_bits is not None:
        ax.axvline(budget_bits, color="black", lw=0.8, ls=":", label=f"budget {budget_bits:.3f} bits")
    ax.set_xlabel("avg bits per target weight (all-in)")
    ax.set_ylabel("KL(float || quantized) on calibration tokens")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
