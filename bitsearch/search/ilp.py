"""Exact allocator: the multiple-choice knapsack as a binary program, solved by HiGHS.

Channels are first grouped into *units* that must share one width (``unit_map``): every
channel alone (``granularity="channel"``), K consecutive rows of a layer (``"group:K"``, the
last group of a layer may be smaller) or a whole layer (``"layer"``); ``share`` patterns tie
the units of several layers index by index (unit i of q, k and v take the same width). A
unit's error and bytes at a width are the sums over its channels. With x_ub = 1 when unit u
takes option b:

    minimize  sum_u sum_b e_ub x_ub
    s.t.      sum_u sum_b c_ub x_ub <= budget - bit map,   sum_b x_ub = 1 for every u,   x binary

solved by ``scipy.optimize.milp`` (HiGHS branch and cut) with sparse constraints. ``min_bits``
drops the options below a floor for the layers it matches. Before solving, every option that
another option of the same unit dominates (no cheaper and no better) is dropped, the objective
is shifted by each unit's best error and rescaled (HiGHS' absolute gap and tolerances are
absolute; raw loss increases can be ~1e-6 per channel), and the bytes by each unit's cheapest
option. When the unconstrained best fits, it is returned without solving.

Unlike ``greedy`` (exact only at the breakpoints of the Lagrangian relaxation) this is exact
between them too, and handles ties and floors greedy cannot. On realistic curves the two
differ by far less than 1 % of the objective; the ILP is the reference, greedy the fast path.

Size: channel granularity is 6 binaries per channel with a 6-width menu. Measured (1 CPU
thread, scipy 1.17 / HiGHS, convex-ish random curves, mip_rel_gap 1e-6, a 2-core machine
busy with another job): 32k channels (190k binaries) solve in ~10-20 s; 500k
channels (a 1B model, 3M binaries) take minutes and GBs of memory. For models that size
use ``granularity="group:K"`` (e.g. group:8 or group:16: 8-16x fewer binaries, a loss of
precision that is negligible next to the sensitivity estimates themselves) or pass a
``time_limit``: the best feasible plan found is then returned and its gap recorded.
"""

from __future__ import annotations

import re
import time

import numpy as np
from scipy import sparse
from scipy.optimize import LinearConstraint, milp

from ..cost import avg_bits
from ..errors import BitsearchError
from .base import Allocator, register_allocator
from .greedy import GreedyAllocator
from .problem import AllocationProblem

__all__ = ["IlpAllocator", "unit_map", "parse_granularity", "unit_problem"]

_GROUP_RE = re.compile(r"^group:(\d+)$")
_OBJ_SCALE = 1e3  # the largest shifted objective coefficient after rescaling
_MAX_FREE = 2000  # with a time limit, the most free units handed to HiGHS


def parse_granularity(granularity: str) -> int | None:
    """Rows per unit within a layer: 1 for "channel", K for "group:K", None for "layer"."""
    if granularity == "channel":
        return 1
    if granularity == "layer":
        return None
    m = _GROUP_RE.match(granularity) if isinstance(granularity, str) else None
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise BitsearchError(f"granularity '{granularity}' is not one of channel, group:K (K >= 1), layer")


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BitsearchError(f"{what} pattern '{pattern}' is not a valid regular expression: {exc}") from None


def _rows(s: slice, n: int) -> np.ndarray:
    return np.arange(*s.indices(n))


def unit_map(problem: AllocationProblem, granularity: str = "channel",
             share: list[str] | None = None) -> tuple[np.ndarray, int]:
    """The unit of every channel: (unit_of_channel (N,) int64, n_units).

    Units are numbered in the order of their first channel. Every channel of a unit must take
    the same width. ``share``: regexes with one capture group, searched in the layer names;
    layers whose match captures the same text (per pattern) form a set whose units are tied
    index by index (sets overlapping through a common layer merge). Rows outside every layer
    slice are units of their own.
    """
    size = parse_granularity(granularity)
    n = problem.n_channels
    names = list(problem.layer_slices)
    rows = {name: _rows(s, n) for name, s in problem.layer_slices.items()}
    n_local = {name: (min(len(r), 1) if size is None else -(-len(r) // size)) for name, r in rows.items()}

    parent = {name: name for name in names}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for pattern in share or []:
        rx = _compile(pattern, "share")
        if rx.groups != 1:
            raise BitsearchError(f"share pattern '{pattern}' must have exactly one capture group "
                                 f"(it has {rx.groups})")
        sets: dict[str, list[str]] = {}
        for name in names:
            m = rx.search(name)
            if m is not None:
                sets.setdefault(m.group(1) or "", []).append(name)
        for key, members in sets.items():
            counts = {n_local[m] for m in members}
            if len(counts) > 1:
                detail = ", ".join(f"{m}: {n_local[m]}" for m in members)
                raise BitsearchError(f"share pattern '{pattern}' ties layers ('{key}') with different numbers of "
                                     f"units at granularity {granularity} ({detail})")
            for m in members[1:]:
                parent[find(m)] = find(members[0])

    unit = np.full(n, -1, dtype=np.int64)
    base: dict[str, int] = {}
    count: dict[str, tuple[str, int]] = {}
    next_id = 0
    for name in names:
        r = rows[name]
        if len(r) == 0:
            continue
        root = find(name)
        if root not in base:
            base[root], count[root] = next_id, (name, n_local[name])
            next_id += n_local[name]
        elif count[root][1] != n_local[name]:  # only through sets merged by overlapping patterns
            raise BitsearchError(f"share patterns tie layers with different numbers of units at granularity "
                                 f"{granularity} ({count[root][0]}: {count[root][1]}, {name}: {n_local[name]})")
        local = np.zeros(len(r), dtype=np.int64) if size is None else np.arange(len(r)) // size
        unit[r] = base[root] + local
    loose = np.flatnonzero(unit < 0)
    unit[loose] = next_id + np.arange(loose.size)
    return unit, next_id + int(loose.size)


def _floors(problem: AllocationProblem, min_bits: dict[str, int] | None) -> np.ndarray | None:
    """Smallest allowed width per channel (None when no floor applies)."""
    if not min_bits:
        return None
    floor = np.full(problem.n_channels, -1, dtype=np.int64)
    for pattern, width in min_bits.items():
        rx = _compile(pattern, "min_bits")
        for name, s in problem.layer_slices.items():
            if rx.search(name):
                r = _rows(s, problem.n_channels)
                if int(width) > max(problem.bits):
                    raise BitsearchError(f"min_bits {width} for '{pattern}' leaves layer {name} no width of the "
                                         f"menu ({', '.join(map(str, problem.bits))})")
                floor[r] = np.maximum(floor[r], int(width))
    return floor


def unit_problem(problem: AllocationProblem, unit: np.ndarray, n_units: int):
    """Errors and costs per unit: (errors (U, n_bits), costs (U, n_bits) int64), summed over channels."""
    if n_units == problem.n_channels and np.array_equal(unit, np.arange(n_units)):
        return problem.errors, problem.costs
    order = np.argsort(unit, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(unit[order]) != 0])
    return (np.add.reduceat(problem.errors[order], starts, axis=0),
            np.add.reduceat(problem.costs[order], starts, axis=0))


def _lagrangian(e: np.ndarray, c: np.ndarray, room: int) -> tuple[float, float, float]:
    """Lagrangian bound of min e(x) s.t. c(x) <= room, one option per row: (lambda, bound, lambda_fit).

    ``e`` holds +inf for options that are not allowed. For lambda >= 0 and any feasible x,
    e(x) >= sum_u min_b (e_ub + lambda c_ub) - lambda * room =: L(lambda), concave in lambda and
    largest where the bytes of its minimizer cross ``room`` (found by bisection). ``lambda_fit``:
    the smallest lambda seen whose minimizer (cheapest on ties) fits.
    """
    rows = np.arange(e.shape[0])

    def at(lam):
        v = e + lam * c
        b = np.where(v <= v.min(axis=1, keepdims=True), c, np.iinfo(np.int64).max).argmin(axis=1)  # cheapest tie
        return float(v[rows, b].sum() - lam * room), int(c[rows, b].sum())

    fin = np.isfinite(e)
    hi = max(float((np.where(fin, e, -np.inf).max(axis=1) - np.where(fin, e, np.inf).min(axis=1)).max()), 1e-300)
    hi *= 2.0  # above every slope (bytes are integers): the minimizer is the cheapest option
    lo = hi * 1e-30
    best = max((at(0.0)[0], 0.0), (at(hi)[0], hi))
    for _ in range(200):
        if hi / lo < 1 + 1e-12:
            break
        mid = float(np.sqrt(lo * hi))
        val, used = at(mid)
        best = max(best, (val, mid))
        if used > room:
            lo = mid
        else:
            hi = mid
    return best[1], best[0], hi


def _reduced(e: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    red = e + lam * c
    return red - red.min(axis=1, keepdims=True)


def _solve(es, cs, live, units, room, rel_gap, time_limit, cutoff=None):
    """HiGHS on ``units`` (their ``live`` options), the other units' bytes already out of ``room``.

    Returns (option per unit of ``units`` or None, scipy result, objective scale)."""
    m = es.shape[1]
    uk, ok = np.nonzero(live[units])  # variables, grouped by unit
    nv = uk.size
    obj = es[units[uk], ok]
    top = obj.max()
    scale = _OBJ_SCALE / top if top > 0 else 1.0
    var = np.arange(nv)
    n = units.size
    rows_i, cols, vals = [uk, np.full(nv, n)], [var, var], [np.ones(nv), cs[units[uk], ok].astype(np.float64)]
    lb, ub = [np.ones(n), [-np.inf]], [np.ones(n), [float(room)]]
    if cutoff is not None:  # objective no worse than the incumbent's: prunes the tree
        rows_i.append(np.full(nv, n + 1))
        cols.append(var)
        vals.append(obj * scale)
        lb.append([-np.inf])
        ub.append([cutoff * scale * (1 + 1e-9) + 1e-9])
    a = sparse.csr_array((np.concatenate(vals), (np.concatenate(rows_i), np.concatenate(cols))),
                         shape=(n + 1 + (cutoff is not None), nv))
    options = {"mip_rel_gap": rel_gap, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 0.01)
    res = milp(obj * scale, integrality=np.ones(nv), bounds=(0, 1),
               constraints=LinearConstraint(a, np.concatenate(lb), np.concatenate(ub)), options=options)
    if res.x is None:
        return None, res, scale
    x = np.full((n, m), -1.0)
    x[uk, ok] = res.x
    return x.argmax(axis=1), res, scale


@register_allocator
class IlpAllocator(Allocator):
    name = "ilp"
    core_size = 256  # units of the first, heuristic solve (their neighbours of the LP optimum)

    def __init__(self, granularity: str = "channel", share: list[str] | None = None,
                 min_bits: dict[str, int] | None = None, time_limit: float | None = None,
                 mip_rel_gap: float = 1e-6):
        parse_granularity(granularity)  # fail early on a bad string
        self.granularity = granularity
        self.share = list(share) if share else None
        self.min_bits = dict(min_bits) if min_bits else None
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap
        self.last_info: dict = {}

    def _left(self, t0, share=1.0):
        if self.time_limit is None:
            return None
        return (self.time_limit - (time.perf_counter() - t0)) * share

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        t0 = time.perf_counter()
        problem.check_budget(budget_bytes)
        unit, n_units = unit_map(problem, self.granularity, self.share)
        e, c = unit_problem(problem, unit, n_units)
        bits = np.asarray(problem.bits)
        m = len(bits)
        rows = np.arange(n_units)
        big = np.iinfo(np.int64).max

        allowed = np.ones((n_units, m), dtype=bool)
        floor = _floors(problem, self.min_bits)
        if floor is not None:
            unit_floor = np.full(n_units, -1, dtype=np.int64)
            np.maximum.at(unit_floor, unit, floor)
            allowed = bits[None, :] >= unit_floor[:, None]
        need = int(np.where(allowed, c, big).min(axis=1).sum()) + problem.fixed_bytes
        if budget_bytes < need:
            raise BitsearchError(
                f"budget {budget_bytes} bytes ({avg_bits(budget_bytes, problem.n_weights):.4f} bits) is below the "
                f"smallest feasible one under the min_bits/share constraints: {need} bytes "
                f"({avg_bits(need, problem.n_weights):.4f} bits)")

        # drop dominated options: another allowed one no dearer and no worse (ties: keep the lowest index)
        keep = allowed.copy()
        idx = np.arange(m)
        for a in range(m):
            ca, ea = c[:, a:a + 1], e[:, a:a + 1]
            better = (ca <= c) & (ea <= e) & ((ca < c) | (ea < e) | (a < idx[None, :])) & (idx[None, :] != a)
            keep &= ~(allowed[:, a:a + 1] & better)

        # shift every unit to its best error and cheapest bytes (constants: one option per unit)
        e_min = np.where(keep, e, np.inf).min(axis=1)
        c_min = np.where(keep, c, big).min(axis=1)
        es = np.where(keep, e - e_min[:, None], np.inf)
        cs = np.where(keep, c - c_min[:, None], 0)
        room = budget_bytes - problem.fixed_bytes - int(c_min.sum())
        base_err = float(e_min.sum())

        best = np.where(es <= 0, cs, big).argmin(axis=1)  # least error, then cheapest
        if int(cs[rows, best].sum()) <= room:
            return self._finish(problem, budget_bytes, best[unit], "optimal", 0.0, base_err, t0, n_units, 0)

        # 1. incumbent: greedy on the unit problem (options not kept: dearer and worse than all, never taken)
        unit_p = AllocationProblem(bits=problem.bits, errors=np.where(keep, es, 2 * es[keep].max() + 1),
                                   costs=np.where(keep, cs, cs.max() + 1), fixed_bytes=0,
                                   n_weights=problem.n_weights, layer_slices={}, group_size=problem.group_size)
        pick = GreedyAllocator().allocate(unit_p, room)
        upper = float(es[rows, pick].sum())
        lam, lower, lam_fit = _lagrangian(es, cs, room)
        lower = max(lower, 0.0)
        red = _reduced(es, cs, lam)
        info = {"greedy": upper + base_err}

        def part_gap(rel, part):  # HiGHS' relative gap on a part of objective ~part, for ``rel`` of the whole
            return min(rel * (upper + base_err) / max(part, 1e-300), 1.0) if rel > 0 else 0.0

        def free_units():
            # reduced-cost fixing: an option whose Lagrangian reduced cost exceeds upper - lower is in
            # no plan better than the incumbent, so it is dropped; units left with one option are fixed
            live = keep & (red <= (upper - lower) + 1e-9 * upper)
            live[rows, pick] = True
            return live, np.flatnonzero(live.sum(axis=1) > 1)

        # 2. better incumbents: the units nearest to changing at the LP optimum (smallest reduced cost
        #    of a second option), solved exactly with every other unit at its Lagrangian choice (which
        #    fits the budget). With a good incumbent the fixing of 3. leaves few units free.
        red_fit = _reduced(es, cs, lam_fit)
        at_fit = np.where(red_fit <= 0, cs, big).argmin(axis=1)
        near = np.where(keep & (idx[None, :] != at_fit[:, None]), red_fit, np.inf).min(axis=1)
        live, free = free_units()
        for size in (self.core_size, 16 * self.core_size):
            if free.size <= size or n_units <= size:
                break
            left = self._left(t0)
            if left is not None and left <= 0:
                break
            core = np.sort(np.argpartition(near, size)[:size])
            out = np.ones(n_units, dtype=bool)
            out[core] = False
            got, _, _ = _solve(es, cs, keep, core, room - int(cs[out, at_fit[out]].sum()),
                               part_gap(1e-9, upper - float(es[out, at_fit[out]].sum())),
                               None if left is None else left / 2)
            if got is not None:
                cand = at_fit.copy()
                cand[core] = got
                cand, _ = self._repair(cand, es, cs, keep, room)
                if float(es[rows, cand].sum()) < upper:
                    pick, upper = cand, float(es[rows, cand].sum())
            live, free = free_units()
        info.update(core_incumbent=upper + base_err, lower=lower + base_err, n_free_units=int(free.size))

        # 3. the units still free, exactly (HiGHS may overrun a short time limit on a large model:
        #    with a time limit, a model beyond _MAX_FREE units is not attempted)
        status, bound, nv = "optimal", upper, 0
        left = self._left(t0)
        if free.size and left is not None and (left <= 0 or free.size > _MAX_FREE):
            status, bound = "time_limit", lower
        elif free.size:
            fixed = np.ones(n_units, dtype=bool)
            fixed[free] = False
            only = np.where(live, 0, 1).argmin(axis=1)  # the one live option of a fixed unit
            fixed_err = float(es[fixed, only[fixed]].sum())
            got, res, scale = _solve(es, cs, live, free, room - int(cs[fixed, only[fixed]].sum()),
                                     part_gap(self.mip_rel_gap, upper - fixed_err), left,
                                     cutoff=upper - fixed_err)
            nv = int(live[free].sum())
            info["highs"] = res.message.strip()
            if got is not None:
                cand = only.copy()
                cand[free] = got
                cand, info["repaired"] = self._repair(cand, es, cs, keep, room)
                if float(es[rows, cand].sum()) < upper:
                    pick, upper = cand, float(es[rows, cand].sum())
            dual = res.mip_dual_bound if res.mip_dual_bound is not None else np.nan
            highs_bound = dual / scale + fixed_err if np.isfinite(dual) else -np.inf
            if res.status == 0 or (res.status == 2 and got is None):  # infeasible under the cutoff: incumbent optimal
                bound = min(max(lower, highs_bound), upper) if res.status == 0 else upper
            elif res.status == 1:
                status, bound = "time_limit", max(lower, highs_bound)
            else:
                raise BitsearchError(f"the ILP solver failed on the reduced problem ({res.message.strip()})")
        total = upper + base_err
        gap = (total - (bound + base_err)) / total if total > 0 else 0.0
        return self._finish(problem, budget_bytes, pick[unit], status, max(gap, 0.0), bound + base_err, t0,
                            n_units, nv, **info)

    @staticmethod
    def _repair(pick, e, c, keep, room):
        """Cheapen units (least error per byte saved first) while over budget: only ever needed when
        the solver's near-integral values round to a plan a few bytes over (tolerances)."""
        rows = np.arange(len(pick))
        n = 0
        while int(c[rows, pick].sum()) > room:
            dc = c[rows, pick][:, None] - c
            de = e - e[rows, pick][:, None]
            ratio = np.where(keep & (dc > 0), de / np.where(dc > 0, dc, 1), np.inf)
            u, b = np.unravel_index(np.argmin(ratio), ratio.shape)
            if not np.isfinite(ratio[u, b]):
                break
            pick[u] = b
            n += 1
        return pick, n

    def _finish(self, problem, budget_bytes, choice, status, gap, bound, t0, n_units, n_vars, **extra):
        used = problem.bytes_of(choice)
        assert used <= budget_bytes, f"ilp plan is over budget: {used} > {budget_bytes}"
        self.last_info = {"status": status, "gap": float(gap), "objective": problem.error_of(choice),
                          "bound": float(bound), "seconds": time.perf_counter() - t0, "n_units": n_units,
                          "n_vars": n_vars, "bytes": used, **extra}
        return choice
