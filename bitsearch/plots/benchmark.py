"""Figures of a comparison of quantization methods at equal stored bytes: perplexity against stored
bits, one line per method; and the perplexity change of each point against its confidence change
(mean predictive entropy), coloured by its KL to the float model."""

from __future__ import annotations

__all__ = ["plot_methods", "plot_confidence"]


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r and not r.get("missing")]


def plot_methods(
    rows: list[dict],
    ref: dict,
    out: str,
    labels: dict | None = None,
    colors: dict | None = None,
    highlight: str | None = None,
    family_prefix: str = "bitsearch",
) -> str:
    """Perplexity (log scale) against stored bits per target weight: one line per ``method`` of
    ``rows`` (dicts with ``method``, ``avg_bits``, ``ppl``; rows with ``skipped`` or ``missing``
    are left out). Methods whose name starts with ``family_prefix`` are drawn solid with circles,
    the others dashed with squares; ``highlight`` thicker; ``ref["ppl"]`` (the float model) dotted.
    ``labels`` / ``colors``: per method (default: the method's name, matplotlib's cycle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from ..atomic import atomic_path

    labels, colors = labels or {}, colors or {}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = _measured(rows)
    for method in dict.fromkeys(r["method"] for r in ok):
        pts = sorted((r["avg_bits"], r["ppl"]) for r in ok if r["method"] == method)
        ours = method.startswith(family_prefix)
        ax.plot(
            *zip(*pts),
            marker="o" if ours else "s",
            lw=2.2 if method == highlight else 1.0,
            ls="-" if ours else "--",
            label=labels.get(method, method),
            color=colors.get(method),
        )
    ax.axhline(ref["ppl"], color="0.3", lw=0.8, ls=":", label=f"float ({ref['ppl']:.1f})")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.0f}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("stored bits per target weight (all-in)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def plot_confidence(curve: list[dict], rows: list[dict], ref: dict, out: str) -> str:
    """Perplexity change (%) against the change of mean predictive entropy: the float model's
    curve under temperature scaling (``curve``: dicts with ``T``, ``ppl``, ``entropy``; T = 1
    must be among them), and the quantized points of ``rows`` (``family`` "peer" or "bitsearch",
    ``ppl``, ``entropy``, ``eval_kl``) against the float point ``ref``, coloured by ``eval_kl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 5))
    one = next(c for c in curve if c["T"] == 1.0)
    ax.plot(
        [c["entropy"] - one["entropy"] for c in curve],
        [100 * (c["ppl"] / one["ppl"] - 1) for c in curve],
        "k-",
        lw=1,
        label="float model, logits / T",
    )
    for c in curve:
        ax.annotate(
            f"T={c['T']:g}",
            (c["entropy"] - one["entropy"], 100 * (c["ppl"] / one["ppl"] - 1)),
            fontsize=7,
            color="0.3",
            xytext=(3, 3),
            textcoords="offset points",
        )
    sc = None
    for family, marker in (("peer", "s"), ("bitsearch", "o")):
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        sc = ax.scatter(
            [r["entropy"] - ref["entropy"] for r in pts],
            [100 * (r["ppl"] / ref["ppl"] - 1) for r in pts],
            c=[r["eval_kl"] for r in pts],
            cmap="viridis",
            marker=marker,
            edgecolor="k",
            lw=0.5,
            vmin=0,
            vmax=max(r["eval_kl"] for r in rows),
            label=f"{family} points",
            zorder=3,
        )
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="KL(float || model) on the evaluation text")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_xlabel("change of mean predictive entropy on the evaluation text (nats; > 0: less confident)")
    ax.set_ylabel("perplexity change against the float model (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
