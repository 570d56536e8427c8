"""The allocation problem every allocator solves.

Choose a width b_c from the menu for every channel c to minimize sum_c e_c(b_c) subject to
sum_c bytes_c(b_c) + bit map <= budget (bytes from ``cost.py``; errors from a
SensitivityTable). Rows follow the table's order; ``layer_slices`` maps each layer to its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cost import BITMAP_BYTES_PER_CHANNEL, check_budget_fits, row_bytes
from ..errors import BitsearchError
from ..models import Target
from ..sensitivity.table import SensitivityTable

__all__ = ["AllocationProblem", "build_problem"]


@dataclass
class AllocationProblem:
    bits: list[int]  # the menu, ascending
    errors: np.ndarray  # (N, n_bits) predicted loss increase
    costs: np.ndarray  # (N, n_bits) bytes per row (bit map excluded)
    fixed_bytes: int  # bit map bytes
    n_weights: int
    layer_slices: dict[str, slice]
    group_size: int

    @property
    def n_channels(self) -> int:
        return self.errors.shape[0]

    def min_bytes(self) -> int:
        return int(self.costs.min(axis=1).sum()) + self.fixed_bytes

    def max_useful_bytes(self) -> int:
        return int(self.costs.max(axis=1).sum()) + self.fixed_bytes

    def bytes_of(self, choice: np.ndarray) -> int:
        """Bytes of a choice (index into ``bits`` per channel)."""
        return int(self.costs[np.arange(self.n_channels), choice].sum()) + self.fixed_bytes

    def error_of(self, choice: np.ndarray) -> float:
        return float(self.errors[np.arange(self.n_channels), choice].sum())

    def check_budget(self, budget_bytes: int) -> None:
        check_budget_fits(budget_bytes, self.min_bytes(), self.n_weights, self.bits[0])

    def widths(self, choice: np.ndarray) -> dict[str, np.ndarray]:
        menu = np.asarray(self.bits, dtype=np.uint8)
        return {name: menu[choice[s]] for name, s in self.layer_slices.items()}


def build_problem(
    table: SensitivityTable,
    targets: list[Target],
    bits: list[int] | None = None,
    min_bits: int | None = None,
    max_bits: int | None = None,
    mix: str | dict | None = None,
) -> AllocationProblem:
    """Problem over ``targets`` using the table's curves (of estimator ``mix``, default the
    table's), restricted to widths in [min, max]."""
    menu = list(table.bits if bits is None else bits)
    missing = [b for b in menu if b not in table.bits]
    if missing:
        raise BitsearchError(
            f"the sensitivity table has no curve for width {missing[0]} (its menu: {', '.join(map(str, table.bits))})"
        )
    lo = menu[0] if min_bits is None else min_bits
    hi = menu[-1] if max_bits is None else max_bits
    menu = sorted(b for b in menu if lo <= b <= hi)
    if not menu:
        raise BitsearchError(f"no width of the menu lies in [min_bits {lo}, max_bits {hi}]")
    all_errors = table.curves(mix=mix, bits=menu)
    by_layer = {name: g for name, g in table.df.reset_index(drop=True).groupby("layer", sort=False)}
    errors, costs, slices, start = [], [], {}, 0
    for t in targets:
        g = by_layer.get(t.name)
        if g is None:
            raise BitsearchError(
                f"the sensitivity table has no rows for target '{t.name}' (was it computed with other `targets`?)"
            )
        if len(g) != t.out_features or int(g["in_features"].iloc[0]) != t.in_features:
            raise BitsearchError(f"the sensitivity table's layer '{t.name}' has another shape than the model's")
        g = g.sort_values("channel")
        errors.append(all_errors[g.index.to_numpy()])
        costs.append(np.tile([row_bytes(t.in_features, b, table.group_size) for b in menu], (t.out_features, 1)))
        slices[t.name] = slice(start, start + t.out_features)
        start += t.out_features
    return AllocationProblem(
        bits=menu,
        errors=np.concatenate(errors),
        costs=np.concatenate(costs).astype(np.int64),
        fixed_bytes=BITMAP_BYTES_PER_CHANNEL * start,
        n_weights=sum(t.numel for t in targets),
        layer_slices=slices,
        group_size=table.group_size,
    )
