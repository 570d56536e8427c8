"""One-figure overview of a sensitivity table: where the error is (block x layer type), how it
spreads over the channels of each layer type (where per-channel allocation pays), and how it
falls with bits (SNR in dB against the 6.02 dB/bit rule, or normalized error curves).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BitsearchError
from ..layer_names import layer_block_and_type, layer_types

__all__ = ["plot_sensitivity", "layer_block_and_type"]  # the latter re-exported from layer_names

_NONBLOCK = "non-block"


def _log10(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log10(x)
    return np.where(np.isfinite(y), y, np.nan)


def shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_sensitivity(table, out: str, estimator: str | None = None, width: int | None = None) -> str:
    """Draw the sensitivity overview of ``table`` (a SensitivityTable) to the PNG ``out``; returns ``out``.

    ``estimator``: whose curves (default: the table's first); ``width``: the reference width
    of the "sensitivity" (default 2 if on the menu, else the smallest nonzero width)."""
    ests = table.estimators
    est = ests[0] if estimator is None else estimator
    if est not in ests:
        raise BitsearchError(f"estimator '{est}' is not in the sensitivity table (it has {', '.join(ests)})")
    bits = table.bits
    nonzero = sorted(b for b in bits if b != 0)
    if not nonzero:
        raise BitsearchError("the sensitivity table has no nonzero width to plot")
    if width is None:
        width = 2 if 2 in bits else nonzero[0]
    if width not in bits:
        raise BitsearchError(f"width {width} is not in the table's bits ({', '.join(map(str, bits))})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    df = table.df
    layers = table.layers
    info = layer_types(layers)
    err = table.curves(mix={est: 1.0}, bits=[width])[:, 0]
    layer_col = df["layer"].to_numpy()
    lerr = _log10(err)
    units = ((table.meta.get("estimator_info") or {}).get(est) or {}).get("units")

    # types: block types in first-appearance order, then non-block targets
    block_types = list(dict.fromkeys(t for b, t in info.values() if b is not None))
    other_types = list(dict.fromkeys(t for b, t in info.values() if b is None))
    types = block_types + other_types
    cmap_t = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    color = {t: cmap_t(i % cmap_t.N) for i, t in enumerate(types)}
    # per-layer channel index (one pass; a table is grouped by layer but need not be sorted)
    codes, uniq = _codes(layer_col, layers)
    ltype = np.array([info[name][1] for name in uniq], dtype=object)[codes]

    fig = plt.figure(figsize=(12, 9), dpi=120)
    gs = fig.add_gridspec(2, 2, width_ratios=[1.0, 1.15], hspace=0.32, wspace=0.42)
    ax_h = fig.add_subplot(gs[:, 0])
    ax_b = fig.add_subplot(gs[0, 1])
    ax_s = fig.add_subplot(gs[1, 1])

    # --- 1. heatmap block x layer type: log10 of the layer's mean channel error
    blocks = sorted({b for b, _ in info.values() if b is not None})
    rows = [str(b) for b in blocks] + ([_NONBLOCK] if other_types else [])
    row_of = {b: i for i, b in enumerate(blocks)}
    grid = np.full((len(rows), len(types)), np.nan)
    sums = np.bincount(codes, weights=np.nan_to_num(err), minlength=len(uniq))
    counts = np.bincount(codes, minlength=len(uniq))
    col_of = {t: j for j, t in enumerate(types)}
    for k, name in enumerate(uniq):
        b, t = info[name]
        i = row_of[b] if b is not None else len(rows) - 1
        mean = sums[k] / max(counts[k], 1)
        grid[i, col_of[t]] = np.log10(mean) if mean > 0 else np.nan
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e6e6e6")
    im = ax_h.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax_h.set_xticks(range(len(types)))
    ax_h.set_xticklabels(types, rotation=40, ha="right", fontsize=8)
    step = max(1, int(np.ceil(len(rows) / 32)))
    yt = [i for i in range(len(rows)) if i % step == 0 or rows[i] == _NONBLOCK]
    ax_h.set_yticks(yt)
    ax_h.set_yticklabels([rows[i] for i in yt], fontsize=8)
    ax_h.set_ylabel("block")
    ax_h.set_xlabel("layer type")
    if other_types:
        ax_h.axhline(len(blocks) - 0.5, color="white", lw=2)
        if len(blocks):
            ax_h.axvline(len(block_types) - 0.5, color="white", lw=2)
    if grid.size <= 160:  # annotate small grids with the values
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax_h.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    cb = fig.colorbar(im, ax=ax_h, fraction=0.06, pad=0.02)
    cb.set_label("log10 mean channel error" + (f" [{shorten(units, 45)}]" if units else ""), fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax_h.set_title(f"where the error is: mean channel error at {width} bits", fontsize=10)

    # --- 2. per-type distributions of log10 channel error, sorted by median
    stats = []
    for t in types:
        v = lerr[(ltype == t) & np.isfinite(lerr)]
        if v.size == 0:
            continue
        p1, q1, med, q3, p99 = np.percentile(v, [1, 25, 50, 75, 99])
        stats.append(
            dict(
                label=t, med=med, q1=q1, q3=q3, whislo=p1, whishi=p99, fliers=[], _min=v.min(), _max=v.max(), _n=v.size
            )
        )
    stats.sort(key=lambda s: s["med"])
    if stats:
        kw = dict(showfliers=False, patch_artist=True, widths=0.6, medianprops=dict(color="black", lw=1.2))
        try:  # matplotlib >= 3.10 spells it orientation=, and deprecates vert=
            art = ax_b.bxp(stats, orientation="horizontal", **kw)
        except TypeError:
            art = ax_b.bxp(stats, vert=False, **kw)
        for patch, s in zip(art["boxes"], stats):
            patch.set_facecolor(color[s["label"]])
            patch.set_alpha(0.55)
        for i, s in enumerate(stats, start=1):
            ax_b.plot([s["_min"], s["_max"]], [i, i], "|", color="0.4", ms=6)
        lo = min(s["_min"] for s in stats)
        hi = max(s["_max"] for s in stats)
        pad = 0.05 * max(hi - lo, 1e-9)
        ax_b.set_xlim(lo - pad, hi + pad * 6)
        for i, s in enumerate(stats, start=1):
            ax_b.text(hi + pad * 1.5, i, f"IQR {s['q3'] - s['q1']:.2f}", va="center", fontsize=7, color="0.25")
        ax_b.tick_params(axis="y", labelsize=8)
    ax_b.set_xlabel(f"log10 channel error at {width} bits (box: IQR, whiskers: 1-99 %, ticks: min/max)", fontsize=8)
    ax_b.grid(True, axis="x", alpha=0.3)
    ax_b.set_title("spread over channels per layer type (wide = per-channel bits pay)", fontsize=10)

    # --- 3. SNR against bits (or normalized error curves)
    if "snr" in ests and all(f"snr.db{b}" in df.columns for b in nonzero):
        db = df[[f"snr.db{b}" for b in nonzero]].to_numpy(dtype=np.float64)
        x = np.asarray(nonzero, dtype=np.float64)
        for t in types:
            sel = db[ltype == t]
            if not len(sel):
                continue
            q1, med, q3 = np.nanpercentile(sel, [25, 50, 75], axis=0)
            ax_s.plot(x, med, "o-", color=color[t], ms=3.5, lw=1.4, label=t)
            ax_s.fill_between(x, q1, q3, color=color[t], alpha=0.12, lw=0)
        ref0 = float(np.nanmedian(db[:, 0]))
        ax_s.plot(x, ref0 + 6.02 * (x - x[0]), "k--", lw=1.0, label="6.02 dB/bit")
        slope = table.metric("snr", "slope_db")
        sl = float(np.nanmean(slope)) if slope is not None and np.isfinite(slope).any() else float("nan")
        ax_s.set_ylabel("SNR [dB] (median, band: IQR)")
        ax_s.set_title(f"SNR vs bits: measured mean slope {sl:.2f} dB/bit (ideal 6.02)", fontsize=10)
        finite = db[np.isfinite(db) & (np.abs(db) < 199.0)]
        if finite.size:
            lo_, hi_ = np.nanpercentile(finite, [1, 99])
            ax_s.set_ylim(min(lo_, ref0) - 3, max(hi_, ref0 + 6.02 * (x[-1] - x[0])) + 3)
    else:
        e = table.curves(mix={est: 1.0}, bits=nonzero)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = e / e[:, :1]
        norm[~np.isfinite(norm) | (norm <= 0)] = np.nan
        for t in types:
            sel = norm[ltype == t]
            if not len(sel) or not np.isfinite(sel).any():
                continue
            q1, med, q3 = np.nanpercentile(sel, [25, 50, 75], axis=0)
            ax_s.plot(nonzero, med, "o-", color=color[t], ms=3.5, lw=1.4, label=t)
            ax_s.fill_between(nonzero, q1, q3, color=color[t], alpha=0.12, lw=0)
        x = np.asarray(nonzero, dtype=np.float64)
        ax_s.plot(x, 4.0 ** -(x - x[0]), "k--", lw=1.0, label="ideal ×1/4 per bit")
        ax_s.set_yscale("log")
        ax_s.set_ylabel(f"e(b) / e({nonzero[0]})  (median, band: IQR)")
        ax_s.set_title(f"{est} error curves normalized at {nonzero[0]} bits", fontsize=10)
    ax_s.set_xlabel("bits")
    ax_s.set_xticks(nonzero)
    ax_s.grid(True, which="both", alpha=0.3)
    ax_s.legend(fontsize=7, ncol=2 if len(types) > 5 else 1, loc="best", framealpha=0.85)

    # --- 4. what this is
    model = table.meta.get("model_name") or (table.meta.get("provenance") or {}).get("model_name") or "unknown model"
    if os.path.isdir(model):  # a local folder: its name, not the whole path
        model = os.path.basename(os.path.normpath(model))
    n_ch = len(df)
    fig.suptitle(
        f"{shorten(str(model), 70)}: sensitivity table ({est} at {width} bits, menu "
        f"{{{', '.join(map(str, bits))}}}, group size {table.meta.get('group_size', '?')}, "
        f"{n_ch:,} channels in {len(layers)} layers)",
        fontsize=11,
    )
    fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=0.09)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _codes(layer_col: np.ndarray, layers: list[str]) -> tuple[np.ndarray, list[str]]:
    index = {name: i for i, name in enumerate(layers)}
    import pandas as pd

    codes = pd.Series(layer_col).map(index).to_numpy(dtype=np.int64)
    return codes, layers
