"""Plots drawn from saved results (used by the demo and by ``analysis/``)."""

from __future__ import annotations

import pandas as pd

__all__ = ["plot_ppl_vs_bits"]


def plot_ppl_vs_bits(results: pd.DataFrame, out_png: str, title: str = "", float_ppl: float | None = None) -> str:
    """Perplexity against avg bits all-in: one series per method (searched plans vs uniform RTN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"greedy": ("o-", "tab:blue", "searched (greedy)"), "uniform": ("s--", "tab:gray", "uniform RTN")}
    for method, g in results.groupby("method", sort=False):
        g = g.sort_values("avg_bits")
        marker, color, label = styles.get(method, ("^-", None, method))
        ax.plot(g["avg_bits"], g["ppl"], marker, color=color, label=label)
        for _, r in g.iterrows():
            ax.annotate(f"{r['ppl']:.1f}", (r["avg_bits"], r["ppl"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    if float_ppl is not None:
        ax.axhline(float_ppl, color="black", lw=0.8, ls=":", label=f"float ({float_ppl:.1f})")
    ax.set_xlabel("avg bits per target weight (all-in: codes + scales + zeros + bit map)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
