"""Reverse water-filling (the ``snr`` allocator): rate-distortion for parallel channels.

For independent Gaussian sources with variances sigma_c^2 under a total-rate limit, the optimal
distortions are D_c = min(theta, sigma_c^2) for one common "water level" theta: every channel
is coded until its noise reaches theta, and a channel whose signal is already below theta gets
no bits at all. On a discrete menu: for a level theta each channel takes the cheapest width
whose predicted error e_c(b) <= theta (a pruned channel's error is its signal, e_c(0)); if no
width gets that low, its most precise one. Bytes fall as theta rises, so the smallest level
whose plan fits the budget is found by bisection over the errors themselves (every level at
which some channel changes width). Never over budget.

This equalizes the noise of every channel, where ``greedy`` equalizes the marginal error per
byte; the two agree when every curve falls by the same factor per bit (about 6 dB per bit).
"""

from __future__ import annotations

import numpy as np

from .base import Allocator, register_allocator
from .problem import AllocationProblem

__all__ = ["WaterfillAllocator", "waterfill_choice"]


def waterfill_choice(problem: AllocationProblem, theta: float) -> np.ndarray:
    """Per channel: the cheapest option with error <= theta (else the most precise option)."""
    ok = problem.errors <= theta
    cost = np.where(ok, problem.costs, np.iinfo(np.int64).max)
    cheapest = cost.argmin(axis=1)
    precise = np.where(
        problem.errors == problem.errors.min(axis=1, keepdims=True), problem.costs, np.iinfo(np.int64).max
    ).argmin(axis=1)
    return np.where(ok.any(axis=1), cheapest, precise)


@register_allocator
class WaterfillAllocator(Allocator):
    name = "snr"

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        problem.check_budget(budget_bytes)
        levels = np.unique(problem.errors)
        fits = lambda t: problem.bytes_of(waterfill_choice(problem, t)) <= budget_bytes  # noqa: E731
        if not fits(levels[-1]):  # only the per-row cheapest options fit
            return problem.costs.argmin(axis=1)
        lo, hi = -1, len(levels) - 1  # invariant: levels[hi] fits; levels[lo] does not (or lo = -1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(levels[mid]):
                hi = mid
            else:
                lo = mid
        return waterfill_choice(problem, levels[hi])
