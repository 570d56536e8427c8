"""Allocation with coupled pruning: whole units (an MLP channel, a key-value head group) at 0 bits.

Without couplings a 0-bit row is just a zero output channel. With them (``couplings.py``) a
unit's producer rows are pruned together and free the consumer's columns too; pruning one
producer row alone would waste its partners (their output is multiplied by the zero), so in
coupled mode producer rows take widths >= the smallest quantizing width, and units are pruned
as a whole. A dead unit's predicted loss is e_unit = the mean of its MLP producer rows' e(0)
(gate row j and up row j each zero h_j: two estimates of one event) or the sum of its value
rows' e(0) (zero values zero the group's heads; q and k rows then do not matter).

The decision is a Lagrangian one. For a multiplier lam, every alive row takes
argmin_b e(b) + lam * bytes(b); a unit dies when

    e_unit - lam * (consumer bytes its columns free)  <  sum over its rows of min_b e(b) + lam * bytes(b)

(the freed consumer bytes are counted at the consumer rows' lam-choices). lam is bisected so the
Lagrangian plan meets the budget; the dead set it gives is then fixed, the consumer's costs are
recomputed at its smaller input width, and the chosen allocator (greedy, ilp, ...) fills the
exact budget with every other width. This is repeated once more (with the consumer costs of the
first pass), and the plan of least predicted loss among these and the plan without dead units is
returned. Never over budget: the allocator gets the exact costs of the fixed dead set.
"""

from __future__ import annotations

import numpy as np

from ..cost import plan_bytes, row_bytes
from ..couplings import Coupling
from ..errors import BitsearchError
from .base import Allocator
from .problem import AllocationProblem

__all__ = ["allocate_coupled", "unit_prune_errors"]


def unit_prune_errors(c: Coupling, problem: AllocationProblem) -> np.ndarray:
    """Predicted loss of each dead unit (see the module docstring)."""
    i0 = problem.bits.index(0)
    if c.kind == "attention":
        v = problem.errors[problem.layer_slices[c.producers[2]], i0]
        return v.reshape(c.n_units, c.unit_rows[2]).sum(axis=1)
    per = [
        problem.errors[problem.layer_slices[p], i0].reshape(c.n_units, r).sum(axis=1)
        for p, r in zip(c.producers, c.unit_rows)
    ]
    return np.mean(per, axis=0)


def _k_live(c: Coupling, dead: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> int:
    return shapes[c.consumer][1] - c.unit_cols * int(dead[c.consumer].sum())


def _fixed_problem(
    problem: AllocationProblem,
    couplings: list[Coupling],
    dead: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, int]],
    consumer_dead: dict[str, np.ndarray] | None = None,
) -> AllocationProblem:
    """Producer rows of dead units cost nothing and are fixed (all options equal); alive producer
    rows cannot take 0 (its option becomes a copy of the smallest quantizing width); consumers
    cost their rows at the live input width of ``consumer_dead`` (default: ``dead``)."""
    consumer_dead = dead if consumer_dead is None else consumer_dead
    i0 = problem.bits.index(0)
    imin = i0 + 1
    errors, costs = problem.errors.copy(), problem.costs.copy()
    for c in couplings:
        d = dead[c.consumer]
        for p, name in enumerate(c.producers):
            s = problem.layer_slices[name]
            rows_dead = np.repeat(d, c.unit_rows[p])
            e, k = errors[s], costs[s]
            e[:, i0], k[:, i0] = e[:, imin], k[:, imin]
            e[rows_dead] = 0.0
            k[rows_dead] = 0
            errors[s], costs[s] = e, k
        k_live = _k_live(c, consumer_dead, shapes)
        costs[problem.layer_slices[c.consumer]] = [row_bytes(k_live, b, problem.group_size) for b in problem.bits]
    return AllocationProblem(
        bits=problem.bits,
        errors=errors,
        costs=costs,
        fixed_bytes=problem.fixed_bytes,
        n_weights=problem.n_weights,
        layer_slices=problem.layer_slices,
        group_size=problem.group_size,
    )


def _widths(
    problem: AllocationProblem, choice: np.ndarray, couplings: list[Coupling], dead: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    widths = problem.widths(choice)
    smallest = problem.bits[problem.bits.index(0) + 1]
    for c in couplings:
        for p, name in enumerate(c.producers):
            rows_dead = np.repeat(dead[c.consumer], c.unit_rows[p])
            w = widths[name].copy()
            w[(w == 0) & ~rows_dead] = smallest  # the copied option stands for the smallest width
            w[rows_dead] = 0
            widths[name] = w
    return widths


def _lagrangian_dead(
    fixed: AllocationProblem,
    couplings: list[Coupling],
    unit_err: dict[str, np.ndarray],
    k_live: dict[str, int],
    lam: float,
) -> tuple[dict[str, np.ndarray], int]:
    """Dead units and Lagrangian bytes at multiplier ``lam`` (``fixed`` has no dead producer rows;
    its consumers have ``k_live`` input columns)."""
    score = fixed.errors + lam * fixed.costs
    pick = score.argmin(axis=1)
    rows = np.arange(fixed.n_channels)
    best, cost = score[rows, pick], fixed.costs[rows, pick].astype(np.float64)
    total = cost.sum() + fixed.fixed_bytes
    dead = {}
    for c in couplings:
        alive_score = np.zeros(c.n_units)
        alive_cost = np.zeros(c.n_units)
        for p, name in enumerate(c.producers):
            s = fixed.layer_slices[name]
            alive_score += best[s].reshape(c.n_units, c.unit_rows[p]).sum(axis=1)
            alive_cost += cost[s].reshape(c.n_units, c.unit_rows[p]).sum(axis=1)
        # consumer bytes one unit frees: its columns' share of the consumer rows' chosen bytes
        s = fixed.layer_slices[c.consumer]
        col_bytes = cost[s].sum() * c.unit_cols / k_live[c.consumer]
        d = unit_err[c.consumer] - lam * col_bytes < alive_score
        if d.all():  # keep one unit: a layer with no unit left is not a model
            d[np.argmax(unit_err[c.consumer] - alive_score)] = False
        dead[c.consumer] = d
        total -= alive_cost[d].sum() + col_bytes * d.sum()
    return dead, int(total)


def _bisect_dead(fixed: AllocationProblem, couplings, unit_err, k_live, budget_bytes: int) -> dict[str, np.ndarray]:
    """The dead set of the smallest multiplier whose Lagrangian plan fits the budget."""
    lo, hi = -12.0, 12.0  # log10 of lam, relative to the problem's error/byte scale
    scale = max(float(np.abs(fixed.errors).max()), 1e-30) / max(float(fixed.costs.max()), 1.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        _, used = _lagrangian_dead(fixed, couplings, unit_err, k_live, scale * 10.0**mid)
        if used > budget_bytes:
            lo = mid
        else:
            hi = mid
    return _lagrangian_dead(fixed, couplings, unit_err, k_live, scale * 10.0**hi)[0]


def allocate_coupled(
    problem: AllocationProblem,
    allocator: Allocator,
    budget_bytes: int,
    couplings: list[Coupling],
    shapes: dict[str, tuple[int, int]],
) -> tuple[dict[str, np.ndarray], float, dict]:
    """Widths per layer, predicted loss and info, pruning whole units where it pays."""
    problem.check_budget(budget_bytes)
    none = {c.consumer: np.zeros(c.n_units, dtype=bool) for c in couplings}
    if 0 not in problem.bits or len(problem.bits) < 2 or not couplings:
        choice = allocator.allocate(problem, budget_bytes)
        return problem.widths(choice), problem.error_of(choice), {"dead_units": 0}
    unit_err = {c.consumer: unit_prune_errors(c, problem) for c in couplings}
    candidates, dead, previous = [], none, none
    for step in range(3):  # no dead units; the Lagrangian dead set; again with its consumer costs
        fixed = _fixed_problem(problem, couplings, dead, shapes)
        if fixed.min_bytes() <= budget_bytes:
            choice = allocator.allocate(fixed, budget_bytes)
            loss = fixed.error_of(choice) + sum(float(unit_err[c.consumer][dead[c.consumer]].sum()) for c in couplings)
            widths = _widths(fixed, choice, couplings, dead)
            used = plan_bytes(shapes, widths, problem.group_size, couplings)
            assert used == fixed.bytes_of(choice) <= budget_bytes, "coupled allocation went over budget"
            candidates.append((loss, widths, int(sum(int(d.sum()) for d in dead.values()))))
        if step == 2:
            break
        previous = dead
        lag = _fixed_problem(problem, couplings, none, shapes, consumer_dead=previous)
        dead = _bisect_dead(
            lag, couplings, unit_err, {c.consumer: _k_live(c, previous, shapes) for c in couplings}, budget_bytes
        )
    if not candidates:
        raise BitsearchError(
            f"budget {budget_bytes} bytes is below the smallest plan with coupled pruning "
            f"(producer rows cannot be pruned one by one; turn coupling off (`coupling`) to allow it)"
        )
    loss, widths, n_dead = min(candidates, key=lambda t: t[0])
    return widths, loss, {"dead_units": n_dead, "coupled_candidates": [round(t[0], 6) for t in candidates]}
