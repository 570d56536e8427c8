"""Uniform allocator: the widest single width that fits the budget, for every channel.

This is round-to-nearest at one width (the baseline every searched plan must beat); it goes
through the same cost model and plan file as the searched plans.
"""

from __future__ import annotations

import numpy as np

from ..io.plan import BitPlan
from ..models import find_targets, model_fingerprint
from .base import Allocator, register_allocator
from .problem import AllocationProblem

__all__ = ["UniformAllocator", "uniform_plan"]


def uniform_plan(model, width: int, group_size: int, targets: str | None = None) -> BitPlan:
    """Every row of every target of ``model`` at ``width`` (no table needed): the plan of
    round-to-nearest (or GPTQ, SignRound, QAT) at one width."""
    tgts = find_targets(model, targets)
    plan = BitPlan(
        model=model_fingerprint(model, tgts),
        group_size=group_size,
        menu=[width],
        bits={t.name: np.full(t.out_features, width, dtype=np.uint8) for t in tgts},
        provenance={"allocator": f"uniform W{width} g{group_size}"},
    )
    plan.fill_summary()
    return plan


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
