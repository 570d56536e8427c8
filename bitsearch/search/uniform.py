"""Uniform allocator: the widest single width that fits the budget, for every channel.

This is round-to-nearest at one width (the baseline every searched plan must beat); it goes
through the same cost model and plan file as the searched plans.
"""

from __future__ import annotations

import numpy as np

from .base import Allocator, register_allocator
from .problem import AllocationProblem

__all__ = ["UniformAllocator"]


@register_allocator
class UniformAllocator(Allocator):
    name = "uniform"

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        problem.check_budget(budget_bytes)
        best = None
        for k in range(len(problem.bits)):
            choice = np.full(problem.n_channels, k)
            if problem.bytes_of(choice) <= budget_bytes:
                best = choice
        if best is None:  # widths cost per layer differently; fall back to the cheapest option
            best = problem.costs.argmin(axis=1)
        return best
