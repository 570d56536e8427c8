"""The greedy allocator's fill loop as first written (every remaining hull segment visited, a
channel blocked once a segment of it no longer fits): the reference the faster fill is tested
against and timed against (``studies.sensitivity_cost --part overheads``)."""

from __future__ import annotations

import numpy as np

from bitsearch.search.greedy import hull_segments

__all__ = ["fill_walking_every_segment"]


def fill_walking_every_segment(p, budget: int) -> np.ndarray:
    start, ch, to, dc, de, step = hull_segments(p.costs, p.errors)
    choice = start.copy()
    room = budget - p.bytes_of(choice)
    order = np.lexsort((step, de / dc))
    cum = np.cumsum(dc[order])
    k = int(np.searchsorted(cum, room, side="right"))
    np.maximum.at(choice, ch[order[:k]], to[order[:k]])
    room -= int(cum[k - 1]) if k else 0
    blocked = np.zeros(p.n_channels, dtype=bool)
    for s in order[k:]:
        if blocked[ch[s]]:
            continue
        if dc[s] <= room:
            choice[ch[s]] = to[s]
            room -= int(dc[s])
        else:
            blocked[ch[s]] = True
    return choice
