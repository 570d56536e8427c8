"""Plots drawn from saved results (used by the demo and by ``analysis/``)."""

from __future__ import annotations

import pandas as pd

__all__ = ["plot_ppl_vs_bits", "plot_gguf_presets"]


def _finish(fig, ax, out_png: str, title: str) -> str:
    """Legend, title, layout; write the PNG atomically and close the figure."""
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png


def plot_ppl_vs_bits(results: pd.DataFrame, out_png: str, title: str = "", float_ppl: float | None = None) -> str:
    """Perplexity against avg bits all-in: one series per method (searched plans vs uniform RTN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"greedy": ("o-", "tab:blue", "searched (greedy)"), "uniform": ("s--", "tab:gray", "uniform RTN")}
    for method, g in results.groupby("method", sort=False):
        g = g.sort_values("avg_bits")
        marker, color, label = styles.get(method, ("^-", None, method))
        ax.plot(g["avg_bits"], g["ppl"], marker, color=color, label=label)
        for _, r in g.iterrows():
            ax.annotate(
                f"{r['ppl']:.1f}",
                (r["avg_bits"], r["ppl"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    if float_ppl is not None:
        ax.axhline(float_ppl, color="black", lw=0.8, ls=":", label=f"float ({float_ppl:.1f})")
    ax.set_xlabel("avg bits per target weight (all-in: codes + scales + zeros + bit map)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return _finish(fig, ax, out_png, title)


def plot_gguf_presets(rows: list[dict], out_png: str, title: str = "") -> str:
    """Perplexity (llama.cpp's) against bits per weight: llama.cpp's preset mixes as labelled points,
    bitsearch's GGUF plans at the same bytes as a curve, the F32 file as a line (``studies.gguf_presets``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pre = [r for r in rows if r["method"] == "llama.cpp"]
    ours = sorted((r for r in rows if r["method"] == "bitsearch"), key=lambda r: r["bpw"])
    ax.scatter(
        [r["bpw"] for r in pre], [r["ppl_llama_cpp"] for r in pre], color="tab:red", label="llama.cpp presets (imatrix)"
    )
    for r in pre:
        ax.annotate(r["at"], (r["bpw"], r["ppl_llama_cpp"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot(
        [r["bpw"] for r in ours],
        [r["ppl_llama_cpp"] for r in ours],
        "o-",
        color="tab:blue",
        label="bitsearch GGUF plans (same bytes)",
    )
    for r in (r for r in rows if r["method"] == "f32"):
        ax.axhline(r["ppl_llama_cpp"], color="gray", ls="--", label=f"F32 ({r['ppl_llama_cpp']:.1f})")
    ax.set_xlabel("bits per weight (tensor data of the quantized matrices)")
    ax.set_ylabel("perplexity (llama.cpp, 512-token windows)")
    ax.grid(True, alpha=0.3)
    return _finish(fig, ax, out_png, title)
