"""One-figure overview of a bit plan: which width every channel of every layer got (an image,
one row per layer), the mix of widths per layer type, and the average bits of each block.
"""

from __future__ import annotations

import numpy as np

from ..cost import layer_bytes
from ..errors import BitsearchError
from ..layer_names import layer_types
from .sensitivity import shorten

__all__ = ["plot_plan", "plot_layer_bits"]

_COLUMNS = 512  # common row width of the image
_PRUNED = "#000000"
_KEPT = "#d62728"  # width 16 (row kept in fp16)


def _width_colors(widths: list[int]) -> list:
    """One colour per width: 0 black, the quantized widths evenly along viridis (from its blue
    end, well away from black, to yellow), 16 red."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    quant = [w for w in widths if w not in (0, 16)]
    pos = {w: 0.18 + 0.82 * k / max(len(quant) - 1, 1) for k, w in enumerate(quant)}
    if len(quant) == 1:
        pos[quant[0]] = 0.6
    return [_PRUNED if w == 0 else _KEPT if w == 16 else cmap(pos[w]) for w in widths]


def _width_label(w: int) -> str:
    return {0: "0 (pruned)", 16: "16 (fp16)"}.get(w, str(w))


def _resample(row: np.ndarray, n: int) -> np.ndarray:  # channel order kept
    """Nearest neighbour by channel fraction: column j shows channel floor((j + 1/2) * len / n)."""
    idx = np.floor((np.arange(n) + 0.5) * len(row) / n).astype(np.int64)
    return row[np.minimum(idx, len(row) - 1)]


def _sorted_row(idx: np.ndarray, n_widths: int, n: int) -> np.ndarray:
    """The row of a layer with its channels sorted by width, as ``n`` columns: each width gets its
    share of the columns (largest remainders), and at least one if any channel has it, so a lone
    pruned or fp16 channel in a wide layer still shows."""
    cnt = np.bincount(idx, minlength=n_widths)
    exact = cnt * n / cnt.sum()
    cols = np.floor(exact).astype(np.int64)
    rest = np.argsort(-(exact - cols), kind="stable")
    cols[rest[: n - cols.sum()]] += 1
    need = (cnt > 0) & (cols == 0)
    for k in np.flatnonzero(need):
        cols[k] = 1
        cols[int(np.argmax(cols))] -= 1
    return np.repeat(np.arange(n_widths), cols)


def plot_plan(plan, out: str, title: str | None = None, sort_channels: bool = True) -> str:
    """Draw the overview of ``plan`` (a BitPlan) to the PNG ``out``; returns ``out``.

    ``title``: put in front of the figure title. ``sort_channels``: sort each layer's channels by
    width before resampling its row (the row then reads as that layer's width mix); False keeps
    the channel order (shows where pruned / wide channels sit)."""
    layers = [name for name, b in plan.bits.items() if len(b)]
    if not layers:
        raise BitsearchError("the plan has no layers with channels to plot")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from ..atomic import atomic_path

    shapes = plan.shapes
    bits = {name: np.asarray(plan.bits[name]).astype(np.int64) for name in layers}
    info = layer_types(layers)
    present = set()
    for b in bits.values():
        present.update(np.unique(b).tolist())
    widths = sorted(set(int(w) for w in plan.menu) | present)
    colors = _width_colors(widths)
    index_of = np.full(17, -1, dtype=np.int64)
    index_of[widths] = np.arange(len(widths))
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(widths) + 1) - 0.5, cmap.N)

    block_types = list(dict.fromkeys(t for b, t in info.values() if b is not None))
    other_types = list(dict.fromkeys(t for b, t in info.values() if b is None))
    types = block_types + other_types
    blocks = sorted({b for b, _ in info.values() if b is not None})

    # per-layer bytes and weights (all-in, as the summary counts them)
    group = plan.group_size
    lbytes, lweights = {}, {}
    for name in layers:
        o, i = shapes.get(name, (len(bits[name]), 1))
        lbytes[name] = layer_bytes(i, bits[name], group)
        lweights[name] = o * i

    fig = plt.figure(figsize=(14, 10), dpi=120)
    gs = fig.add_gridspec(2, 2, width_ratios=[1.35, 1.0], height_ratios=[1.0, 1.0], hspace=0.36, wspace=0.30)
    ax_i = fig.add_subplot(gs[:, 0])
    ax_t = fig.add_subplot(gs[0, 1])
    ax_b = fig.add_subplot(gs[1, 1])

    # --- 1. image: one row per layer, widths resampled to a common number of columns
    img = np.empty((len(layers), _COLUMNS), dtype=np.int64)
    for r, name in enumerate(layers):
        idx = index_of[bits[name]]
        img[r] = _sorted_row(idx, len(widths), _COLUMNS) if sort_channels else _resample(idx, _COLUMNS)
    im = ax_i.imshow(img, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    labels = [f"{b}.{t}" if b is not None else t for b, t in info.values()]
    n = len(layers)
    if n <= 72:  # every layer gets its label
        ax_i.set_yticks(range(n))
        ax_i.set_yticklabels(labels, fontsize=max(4.5, min(8.0, 480.0 / n)))
        ax_i.set_ylabel("layer (block.type), in plan order")
    else:  # label the first layer of every k-th block, and the non-block layers
        first = {}
        for r, (b, t) in enumerate(info.values()):
            first.setdefault(b if b is not None else ("nb", t), r)
        step = max(1, int(np.ceil(len(blocks) / 32)))
        ticks = [(r, f"block {k}") for k, r in first.items() if not isinstance(k, tuple) and k % step == 0]
        ticks += [(r, k[1]) for k, r in first.items() if isinstance(k, tuple)]
        ticks.sort()
        ax_i.set_yticks([r for r, _ in ticks])
        ax_i.set_yticklabels([s for _, s in ticks], fontsize=7)
        order = ", ".join(block_types)
        ax_i.set_ylabel(shorten(f"layer in plan order (per block: {order})", 110), fontsize=9)
    # thin separators between blocks
    prev = None
    for r, (b, _) in enumerate(info.values()):
        if r and b != prev:
            ax_i.axhline(r - 0.5, color="white", lw=0.6 if n > 72 else 0.9)
        prev = b
    ax_i.set_xticks(np.linspace(-0.5, _COLUMNS - 0.5, 5))
    ax_i.set_xticklabels(["0", "25 %", "50 %", "75 %", "100 %"], fontsize=8)
    ax_i.set_xlabel(
        (
            "channels sorted by width within each layer (rare widths get >= 1 column)"
            if sort_channels
            else "channels in their order (nearest channel)"
        )
        + ": share of the layer's channels",
        fontsize=9,
    )
    ax_i.set_title("bit width of every channel, one row per layer", fontsize=10)
    cb = fig.colorbar(im, ax=ax_i, fraction=0.035, pad=0.015, ticks=np.arange(len(widths)))
    cb.ax.set_yticklabels([_width_label(w) for w in widths], fontsize=8)
    cb.ax.set_title("bits", fontsize=9)

    # --- 2. width mix per layer type (share of channels), plus all layers
    share = np.zeros((len(types) + 1, len(widths)))
    tbytes = np.zeros(len(types) + 1)
    tweights = np.zeros(len(types) + 1)
    col = {t: j for j, t in enumerate(types)}
    for name in layers:
        j = col[info[name][1]]
        cnt = np.bincount(index_of[bits[name]], minlength=len(widths))
        for k in (j, len(types)):
            share[k] += cnt
            tbytes[k] += lbytes[name]
            tweights[k] += lweights[name]
    share = share / share.sum(axis=1, keepdims=True)
    xl = types + ["all"]
    x = np.arange(len(xl), dtype=np.float64)
    x[-1] += 0.5  # a gap before "all"
    bottom = np.zeros(len(xl))
    for w, (wi, c) in zip(widths, enumerate(colors)):
        ax_t.bar(x, share[:, wi], bottom=bottom, color=c, width=0.75, edgecolor="white", lw=0.4, label=_width_label(w))
        for k in range(len(xl)):
            if share[k, wi] >= 0.07:
                rgb = matplotlib.colors.to_rgb(c)
                dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                ax_t.text(
                    x[k],
                    bottom[k] + share[k, wi] / 2,
                    f"{100 * share[k, wi]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if dark else "black",
                )
        bottom += share[:, wi]
    avg_t = 8.0 * tbytes / np.maximum(tweights, 1)
    for k in range(len(xl)):
        ax_t.text(x[k], 1.015, f"{avg_t[k]:.2f}", ha="center", va="bottom", fontsize=7)
    ax_t.set_xticks(x)
    ax_t.set_xticklabels(xl, rotation=35, ha="right", fontsize=8)
    ax_t.set_ylim(0, 1.09)
    ax_t.set_yticks(np.linspace(0, 1, 6))
    ax_t.set_yticklabels([f"{v:.0f} %" for v in np.linspace(0, 100, 6)], fontsize=8)
    ax_t.set_ylabel("share of channels (numbers: %)", fontsize=9)
    ax_t.set_title("width mix per layer type (above bars: all-in avg bits)", fontsize=10)

    # --- 3. all-in average bits per block (bars), per layer type within each block (lines)
    groups = [(str(b), [n_ for n_ in layers if info[n_][0] == b]) for b in blocks]
    groups += [(t, [n_ for n_ in layers if info[n_][0] is None and info[n_][1] == t]) for t in other_types]
    gx = np.arange(len(groups), dtype=np.float64)
    if other_types and blocks:
        gx[len(blocks) :] += 0.6
    gavg = np.array([8.0 * sum(lbytes[n_] for n_ in g) / max(sum(lweights[n_] for n_ in g), 1) for _, g in groups])
    bar_c = ["#9ecae1"] * len(blocks) + ["#fdae6b"] * len(other_types)
    ax_b.bar(gx, gavg, width=0.8, color=bar_c, edgecolor="#4a6f8a", lw=0.5, zorder=1, label="block (all its weights)")
    line_top = 0.0
    if blocks and len(block_types) > 1:
        tcmap = plt.get_cmap("tab10" if len(block_types) <= 10 else "tab20")
        for j, t in enumerate(block_types):
            ys = []
            for b in blocks:
                g = [n_ for n_ in layers if info[n_] == (b, t)]
                ys.append(8.0 * sum(lbytes[n_] for n_ in g) / sum(lweights[n_] for n_ in g) if g else np.nan)
            line_top = max(line_top, float(np.nanmax(ys)))
            ax_b.plot(
                gx[: len(blocks)],
                ys,
                "o-" if len(blocks) <= 12 else "-",
                ms=3,
                lw=1.1,
                color=tcmap(j % tcmap.N),
                alpha=0.9,
                zorder=2,
                label=t,
            )
    total = 8.0 * sum(lbytes.values()) / max(sum(lweights.values()), 1)
    ax_b.axhline(total, color="black", ls="--", lw=0.9, zorder=3, label=f"whole plan {total:.2f}")
    step = max(1, int(np.ceil(len(blocks) / 16)))
    ticks = [k for k in range(len(groups)) if k >= len(blocks) or k % step == 0]
    ax_b.set_xticks(gx[ticks])
    ax_b.set_xticklabels(
        [groups[k][0] for k in ticks],
        fontsize=8,
        rotation=30 if other_types else 0,
        ha="right" if other_types else "center",
    )
    ax_b.set_xlabel("block" + (" (orange: layers outside the blocks)" if other_types else ""), fontsize=9)
    ax_b.set_ylabel("all-in avg bits per weight", fontsize=9)
    top = max(float(np.nanmax(gavg)), total, line_top)
    ax_b.set_ylim(0, top * 1.4 + 0.1)
    ax_b.grid(True, axis="y", alpha=0.3)
    ax_b.legend(fontsize=7, ncol=3, loc="upper left", framealpha=0.85)
    ax_b.set_title("where the bits went: avg bits per block (lines: per layer type)", fontsize=10)

    # --- 4. title: what this plan is
    s = plan.summary or {}
    n_bytes = int(s.get("bytes") if s.get("bytes") is not None else sum(lbytes.values()))
    avg = s.get("avg_bits")
    avg = float(avg) if avg is not None else total
    n_ch = int(s.get("n_channels") or sum(len(b) for b in bits.values()))
    pruned = s.get("pruned_channels")
    pruned = int(pruned if pruned is not None else sum(int((b == 0).sum()) for b in bits.values()))
    gsz = "per row" if group == -1 else str(group)
    model = (plan.model or {}).get("model_type")
    head = f"{shorten(title, 60)}: " if title else ""
    head += f"bit plan{f' for {model}' if model else ''}: {avg:.3f} avg bits all-in, {_mb(n_bytes)}"
    line2 = (
        f"{pruned:,} of {n_ch:,} channels pruned ({100.0 * pruned / max(n_ch, 1):.1f} %), "
        f"{len(layers)} layers, menu {{{', '.join(map(str, plan.menu))}}}, group size {gsz}"
    )
    fig.suptitle(head + "\n" + line2, fontsize=11)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.91, bottom=0.08)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _mb(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB ({n:,} bytes)"
    if n >= 10**6:
        return f"{n / 1e6:.2f} MB ({n:,} bytes)"
    return f"{n:,} bytes"


def plot_layer_bits(layers: list[str], avg_bits: list[float], out: str, title: str = "") -> str:
    """Bar chart of the all-in average bits of each layer (``layers`` in plan order, names shown
    without their ``model.layers.`` prefix); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    if not layers:
        raise BitsearchError("the plan has no layers to plot")
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.18), 4), dpi=110)
    ax.bar(range(len(layers)), avg_bits, color="tab:blue")
    ax.set_xticks(range(len(layers)), [n.replace("model.layers.", "") for n in layers], rotation=90, fontsize=6)
    ax.set_ylabel("avg bits (all-in)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
