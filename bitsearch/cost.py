"""Exact storage cost of a bit plan, byte for byte what ``apply`` writes for the targets.

Per target layer with K input features, R output channels and group size G:

    width b in 2..8 : ceil(K*b/8) code bytes + n_groups * (2 + 1) bytes (fp16 scale + uint8 zero)
    width 16        : 2*K bytes (the row kept in float16)
    width 0         : 0 bytes (pruned)
    bit map         : 1 byte per channel (the width of each row, uint8)

avg bits ("all-in") = 8 * bytes / number of target weights (pruned ones included).
With coupled pruning (``couplings.py``) a consumer layer's K is its live columns only.
Biases of target layers are not counted: they are kept untouched, like every tensor outside
the targets.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import BitsearchError
from .quant.grid import KEEP_WIDTH, PRUNE_WIDTH, QUANT_WIDTHS, n_groups
from .quant.packing import packed_row_bytes

__all__ = [
    "SCALE_BYTES",
    "ZERO_BYTES",
    "BITMAP_BYTES_PER_CHANNEL",
    "row_bytes",
    "layer_bytes",
    "plan_bytes",
    "avg_bits",
    "check_budget_fits",
    "parse_budget",
    "budget_to_bytes",
]

SCALE_BYTES = 2
ZERO_BYTES = 1
BITMAP_BYTES_PER_CHANNEL = 1


def row_bytes(in_features: int, bits: int, group_size: int) -> int:
    """Bytes one output row takes at width ``bits`` (bit map excluded)."""
    if bits == PRUNE_WIDTH:
        return 0
    if bits == KEEP_WIDTH:
        return 2 * in_features
    if bits in QUANT_WIDTHS:
        return packed_row_bytes(in_features, bits) + n_groups(in_features, group_size) * (SCALE_BYTES + ZERO_BYTES)
    raise ValueError(f"width {bits} is not one of 0, 2..8, 16")


def layer_bytes(in_features: int, bits: Sequence[int] | np.ndarray, group_size: int) -> int:
    """Bytes of one layer whose rows have the given widths (bit map included)."""
    bits = np.asarray(bits)
    widths, counts = np.unique(bits, return_counts=True)
    total = sum(int(c) * row_bytes(in_features, int(b), group_size) for b, c in zip(widths, counts))
    return total + BITMAP_BYTES_PER_CHANNEL * len(bits)


def plan_bytes(
    shapes: Mapping[str, tuple[int, int]], bits: Mapping[str, Iterable[int]], group_size: int, couplings: Sequence = ()
) -> int:
    """Bytes of a whole plan; ``shapes[name] = (out_features, in_features)``. With ``couplings``
    (``couplings.Coupling``), a consumer is stored without the columns its dead units free."""
    bits = {name: np.asarray(list(b)) for name, b in bits.items()}
    k_of = {name: shape[1] for name, shape in shapes.items()}
    if couplings:
        from .couplings import consumer_in_features

        k_of.update(consumer_in_features(list(couplings), shapes, bits))
    return sum(layer_bytes(k_of[name], b, group_size) for name, b in bits.items())


def avg_bits(n_bytes: int, n_weights: int) -> float:
    return 8.0 * n_bytes / n_weights


def check_budget_fits(budget_bytes: int, need: int, n_weights: int, lowest: int) -> None:
    """Refuse a budget below ``need``, the bytes of every row at the ``lowest`` width allowed."""
    if budget_bytes < need:
        raise BitsearchError(
            f"budget {budget_bytes} bytes ({avg_bits(budget_bytes, n_weights):.4f} bits) is below the "
            f"smallest feasible one with widths >= {lowest}: {need} bytes ({avg_bits(need, n_weights):.4f} bits)"
            + ("; give at least that, or allow pruning with `min_bits` 0" if lowest > 0 else "")
        )


_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|KIB|MIB|GIB)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(text: str | float) -> tuple[str, float]:
    """``"2.5"`` -> ("bits", 2.5); ``"12MB"`` -> ("bytes", 12e6); ``"12MiB"`` -> ("bytes", 12*2**20)."""
    if isinstance(text, (int, float)):
        value = float(text)
        kind = "bits"
    else:
        m = _BYTES_RE.match(text)
        if m:
            return "bytes", float(m.group(1)) * _UNITS[m.group(2).upper()]
        try:
            value = float(text)
        except ValueError:
            raise BitsearchError(
                f"budget '{text}' is neither average bits (e.g. 2.5) nor a size (e.g. 12MB, 12MiB)"
            ) from None
        kind = "bits"
    if not (0 < value <= 16):
        raise BitsearchError(f"budget {value} bits is outside (0, 16]")
    return kind, value


def budget_to_bytes(budget: str | float, n_weights: int) -> int:
    """The byte budget for the targets (rounded down: never over)."""
    kind, value = parse_budget(budget)
    if kind == "bits":
        return int(np.floor(value * n_weights / 8.0))
    return int(np.floor(value))
