"""Greedy Lagrangian allocator for the multiple-choice knapsack.

Each channel's options (bytes_b, e_c(b)) are reduced to their lower convex hull; walking a
hull from its cheapest point gives segments with increasing slopes de/dbytes. Sorting every
segment of every channel by slope (most negative first) and taking them while the budget
allows traces the Lagrangian relaxation min sum e + lambda * bytes for decreasing lambda:
at every budget equal to a prefix of that order the choice is exactly optimal. Past the first
segment that no longer fits, the remaining segments are tried in the same order (a channel's
later segments only after its earlier ones), so no byte that can still buy an improvement is
left unused (only segments that fit the remaining bytes are visited, and the walk stops when
none of the rest fits). Never over budget. O(N * n_bits) to build the hulls, O(S log S) to sort.
"""

from __future__ import annotations

import numpy as np

from .base import Allocator, register_allocator
from .problem import AllocationProblem

__all__ = ["GreedyAllocator", "hull_segments"]


def hull_segments(costs: np.ndarray, errors: np.ndarray):
    """Lower-convex-hull walks of every channel, vectorized over channels.

    Options must be sorted by cost per row. Returns (start, seg_channel, seg_to, seg_dcost,
    seg_derr, seg_step): ``start`` is each channel's cheapest option (ties: smallest error);
    segment k moves channel ``seg_channel[k]`` to option ``seg_to[k]``.
    """
    n, m = costs.shape
    rows = np.arange(n)
    min_cost = costs.min(axis=1, keepdims=True)
    start = np.where(costs == min_cost, errors, np.inf).argmin(axis=1)
    cur = start.copy()
    active = np.ones(n, dtype=bool)
    seg = {"ch": [], "to": [], "dc": [], "de": [], "step": []}
    idx = np.arange(m)
    for step in range(m - 1):
        dc = costs - costs[rows, cur][:, None]
        de = errors - errors[rows, cur][:, None]
        valid = (idx[None, :] > cur[:, None]) & (dc > 0) & (de < 0) & active[:, None]
        slope = np.where(valid, de / np.where(dc > 0, dc, 1), np.inf)
        nxt = slope.argmin(axis=1)
        ok = np.isfinite(slope[rows, nxt])
        if not ok.any():
            break
        ch = rows[ok]
        seg["ch"].append(ch)
        seg["to"].append(nxt[ok])
        seg["dc"].append(dc[ch, nxt[ok]])
        seg["de"].append(de[ch, nxt[ok]])
        seg["step"].append(np.full(ch.size, step))
        cur = np.where(ok, nxt, cur)
        active &= ok
    if not seg["ch"]:
        empty = np.zeros(0, dtype=np.int64)
        return start, empty, empty, empty, np.zeros(0), empty
    cat = {k: np.concatenate(v) for k, v in seg.items()}
    return start, cat["ch"], cat["to"], cat["dc"].astype(np.int64), cat["de"], cat["step"]


@register_allocator
class GreedyAllocator(Allocator):
    name = "greedy"

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        problem.check_budget(budget_bytes)
        start, ch, to, dc, de, step = hull_segments(problem.costs, problem.errors)
        choice = start.copy()
        room = budget_bytes - problem.bytes_of(choice)
        if ch.size == 0:
            return choice
        order = np.lexsort((step, de / dc))  # by slope, then hull order within a channel
        cum = np.cumsum(dc[order])
        k = int(np.searchsorted(cum, room, side="right"))  # segments order[:k] fit
        taken = order[:k]
        # a channel's hull steps move to ever higher options: its furthest taken step wins
        np.maximum.at(choice, ch[taken], to[taken])
        room -= int(cum[k - 1]) if k else 0
        fill(choice, order[k:], ch, to, dc, step, order[:k], room)
        return choice


def fill(
    choice: np.ndarray,
    rest: np.ndarray,
    ch: np.ndarray,
    to: np.ndarray,
    dc: np.ndarray,
    step: np.ndarray,
    taken: np.ndarray,
    room: int,
) -> None:
    """Spend ``room`` bytes on the segments ``rest`` in order (``taken``: the segments already
    bought): a segment is bought when its channel's previous hull step was bought and it fits
    (a step that did not fit rules out its channel's later steps). Only segments that fit the
    initial room are visited, and the walk stops once none of the remaining ones fits."""
    rest = rest[dc[rest] <= room]
    if rest.size == 0:
        return
    bought = np.zeros(dc.size, dtype=bool)
    bought[taken] = True
    pred = np.full(dc.size, -1, dtype=np.int64)  # the same channel's previous hull step
    last = np.full(choice.size, -1, dtype=np.int64)
    for t in range(int(step.max()) + 1):
        idx = np.flatnonzero(step == t)
        pred[idx] = last[ch[idx]]
        last[ch[idx]] = idx
    rest_dc = dc[rest]
    cheapest_left = np.minimum.accumulate(rest_dc[::-1])[::-1]
    for i, s in enumerate(rest.tolist()):
        if room < cheapest_left[i]:
            break
        p = pred[s]
        if (p >= 0 and not bought[p]) or rest_dc[i] > room:
            continue
        bought[s] = True
        choice[ch[s]] = to[s]
        room -= int(rest_dc[i])
