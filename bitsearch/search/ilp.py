"""Exact allocator: the multiple-choice knapsack as an integer program (``ilp``).

Channels are first grouped into *units* that take one width together (``unit_map``): every
channel alone (``granularity="channel"``), K consecutive rows of a layer (``"group:K"``; the last
group of a layer may be smaller) or a whole layer (``"layer"``). ``share`` patterns tie the units
of several layers index by index (unit i of q, k and v take one width); ties merge units rather
than add equality constraints. A unit's error and bytes at a width are sums over its channels.
With x_ub = 1 when unit u takes option b:

    minimize  sum_u sum_b e_ub x_ub
    s.t.      sum_u sum_b c_ub x_ub <= budget - bit map,   sum_b x_ub = 1 for every u,   x binary

``min_bits`` ({regex: width}) removes the options below a floor for the layers it matches.

Solving it as one binary program with HiGHS is exact but slow: 65 s for 4.5k channels (27k
binaries) at a 1e-6 gap, and HiGHS overran a 0.1 s time limit by 80 s in presolve on a 20k-binary
model. The knapsack has more structure, used here without giving up exactness:

1. Reductions. Options dominated within their unit (no cheaper, no better) are dropped; errors and
   bytes are shifted by each unit's best error and cheapest bytes. All shifted costs are multiples
   of their gcd (32 bytes for typical shapes), so the budget is rounded down to one: the bytes
   below it can never be spent, and without this the LP bound "spends" them and stays loose.
2. Bounds. Incumbent: ``greedy`` on the units. Lower bound: the Lagrangian (= LP) bound at the
   multiplier where greedy's hull walk crosses the budget.
3. Core. The ``core_size`` (256) units whose second-best option has the least reduced cost are
   solved exactly with every other unit at its Lagrangian choice: in every case measured this
   found the optimum.
4. Reduced-cost fixing. A plan taking an option of reduced cost r is worth at least
   lower + r, so options with r > incumbent - lower - tol are dropped (tol = mip_rel_gap times the
   objective) and units left with one option are fixed. On the problems measured this leaves
   0 to a few hundred free units (but all units of a layer whose channels are identical).
5. Exact solve of the free units: by dynamic programming over bytes (in gcd steps, windowed,
   memory ~ sqrt(units) x steps) when its work is below _DP_WORK, else by
   ``scipy.optimize.milp`` (HiGHS, sparse constraints, identical units merged into integer
   count variables). ``solver="highs"`` uses HiGHS for 3. and 5. regardless.

The result is within ``mip_rel_gap`` of the optimum, relative to the whole objective (exact with
0). Never over budget. ``last_info`` records status ("optimal" or "time_limit"), gap (certified:
(objective - bound) / objective), objective, bound, seconds, and diagnostics (greedy, lower,
n_free_units, solver). With ``time_limit`` the best plan found (at worst greedy's) comes back with
status "time_limit" and its gap; HiGHS is not started on a model it would likely overrun the limit
on. The dynamic program has no time limit but its work is capped (about 5 s).

Solve times (up to a ~1B-parameter model's 518k channels, a few seconds), the cost of the
``group:K`` and ``layer`` constraints and greedy's distance from the optimum are measured in
docs/search-methods.md.
"""

from __future__ import annotations

import re
import time

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from ..cost import avg_bits
from ..errors import BitsearchError
from .base import Allocator, register_allocator
from .greedy import GreedyAllocator, hull_segments
from .problem import AllocationProblem

__all__ = ["IlpAllocator", "unit_map", "parse_granularity", "unit_problem"]

_GROUP_RE = re.compile(r"^group:(\d+)$")
_OBJ_SCALE = 1e3  # the largest shifted objective coefficient after rescaling
_HIGHS_SECONDS_PER_UNIT = 0.01  # HiGHS may overrun a time limit below this (presolve): not started then
_DP_WORK = 1_500_000_000  # most dynamic-programming updates (rows x byte steps x options): ~5 s


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


def unit_map(
    problem: AllocationProblem, granularity: str = "channel", share: list[str] | None = None
) -> tuple[np.ndarray, int]:
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
            raise BitsearchError(f"share pattern '{pattern}' must have exactly one capture group (it has {rx.groups})")
        sets: dict[str, list[str]] = {}
        for name in names:
            m = rx.search(name)
            if m is not None:
                sets.setdefault(m.group(1) or "", []).append(name)
        for key, members in sets.items():
            counts = {n_local[m] for m in members}
            if len(counts) > 1:
                detail = ", ".join(f"{m}: {n_local[m]}" for m in members)
                raise BitsearchError(
                    f"share pattern '{pattern}' ties layers ('{key}') with different numbers of "
                    f"units at granularity {granularity} ({detail})"
                )
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
            raise BitsearchError(
                f"share patterns tie layers with different numbers of units at granularity "
                f"{granularity} ({count[root][0]}: {count[root][1]}, {name}: {n_local[name]})"
            )
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
                    raise BitsearchError(
                        f"min_bits {width} for '{pattern}' leaves layer {name} no width of the "
                        f"menu ({', '.join(map(str, problem.bits))})"
                    )
                floor[r] = np.maximum(floor[r], int(width))
    return floor


def unit_problem(problem: AllocationProblem, unit: np.ndarray, n_units: int):
    """Errors and costs per unit: (errors (U, n_bits), costs (U, n_bits) int64), summed over channels."""
    if n_units == problem.n_channels and np.array_equal(unit, np.arange(n_units)):
        return problem.errors, problem.costs
    order = np.argsort(unit, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(unit[order]) != 0])
    return (
        np.add.reduceat(problem.errors[order], starts, axis=0),
        np.add.reduceat(problem.costs[order], starts, axis=0),
    )


def _lagrangian(e: np.ndarray, c: np.ndarray, room: int, e_hull: np.ndarray, c_hull: np.ndarray) -> tuple[float, float]:
    """Lagrangian (= LP) bound of min e(x) s.t. c(x) <= room, one option per row: (lambda, bound).

    ``e`` holds +inf for options that are not allowed (``e_hull``/``c_hull``: the same with finite
    stand-ins, dearer and worse than every option). For lambda >= 0 and any feasible x,
    e(x) >= sum_u min_b (e_ub + lambda c_ub) - lambda * room =: L(lambda), largest at the slope of
    the hull segment where greedy's walk (steepest first) crosses ``room``. Rows must have a
    zero-cost option (shifted costs).
    """
    _, _, _, dc, de, step = hull_segments(c_hull, e_hull)
    lam = 0.0
    if dc.size:
        order = np.lexsort((step, de / dc))
        k = int(np.searchsorted(np.cumsum(dc[order]), room, side="right"))
        if k < order.size:
            lam = float(-de[order[k]] / dc[order[k]])
    return lam, float((e + lam * c).min(axis=1).sum() - lam * room)


def _reduced(e: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    red = e + lam * c
    return red - red.min(axis=1, keepdims=True)


def _solve(es, cs, live, units, room, rel_gap, time_limit, cutoff=None):
    """HiGHS on ``units`` (their ``live`` options), the other units' bytes already out of ``room``.

    Identical units (same live options, errors and bytes) are merged into one class whose
    variables count how many of its units take each option (integers in [0, class size]): an
    exact reformulation that removes the symmetry of many tied units. Returns (option per unit
    of ``units`` or None, scipy result, objective scale)."""
    m = es.shape[1]
    key = np.concatenate([np.where(live[units], es[units], -1.0), np.where(live[units], cs[units], -1)], axis=1)
    _, first, cls, size = np.unique(key, axis=0, return_index=True, return_inverse=True, return_counts=True)
    cls = cls.ravel()
    reps = units[first]
    n = reps.size
    uk, ok = np.nonzero(live[reps])  # variables, grouped by class
    nv = uk.size
    obj = es[reps[uk], ok]
    top = obj.max()
    scale = _OBJ_SCALE / top if top > 0 else 1.0
    var = np.arange(nv)
    rows_i, cols, vals = [uk, np.full(nv, n)], [var, var], [np.ones(nv), cs[reps[uk], ok].astype(np.float64)]
    lb, ub = [size.astype(np.float64), [-np.inf]], [size.astype(np.float64), [float(room)]]
    if cutoff is not None:  # objective no worse than the incumbent's: prunes the tree
        rows_i.append(np.full(nv, n + 1))
        cols.append(var)
        vals.append(obj * scale)
        lb.append([-np.inf])
        ub.append([cutoff * scale * (1 + 1e-9) + 1e-9])
    a = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows_i), np.concatenate(cols))), shape=(n + 1 + (cutoff is not None), nv)
    )
    options = {"mip_rel_gap": rel_gap, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = max(float(time_limit), 0.01)
    res = milp(
        obj * scale,
        integrality=np.ones(nv),
        bounds=Bounds(np.zeros(nv), size[uk].astype(np.float64)),
        constraints=LinearConstraint(a, np.concatenate(lb), np.concatenate(ub)),
        options=options,
    )
    if res.x is None:
        return None, res, scale
    counts = np.zeros((n, m), dtype=np.int64)
    counts[uk, ok] = np.rint(res.x).astype(np.int64)
    # rounding noise: make every class's counts add up to its size (at its most used option)
    fix = size - counts.sum(axis=1)
    counts[np.arange(n), counts.argmax(axis=1)] += fix
    got = np.empty(units.size, dtype=np.int64)
    order = np.argsort(cls, kind="stable")  # members of each class, consecutively
    got[order] = np.concatenate([np.repeat(np.arange(m), counts[k]) for k in range(n)])
    return got, res, scale


def _knapsack_dp(e: np.ndarray, c: np.ndarray, live: np.ndarray, room: int) -> np.ndarray | None:
    """Exact min sum e s.t. sum c <= room, one live option per row, by dynamic programming over
    bytes in steps of the gcd of the cost differences: f_i(s) = least error of rows 0..i within s
    steps. Row i only needs the states that rows before it can reach and that can still lead to
    the full budget (a window); the table of choices is rebuilt block by block from checkpoints
    of f (memory ~ sqrt(rows) * steps). None when the work would exceed _DP_WORK."""
    n, m = e.shape
    big = np.iinfo(np.int64).max
    base = np.where(live, c, big).min(axis=1)
    d = np.where(live, c - base[:, None], 0)
    cap = room - int(base.sum())
    if cap < 0 or n == 0:
        return None
    pos = live & (d > 0)
    g = int(np.gcd.reduce(d[pos])) if pos.any() else 1
    d //= g
    maxd = d.max(axis=1)
    cap = min(cap // g, int(maxd.sum()))
    reach = np.cumsum(maxd)
    lo = np.maximum(0, cap - (int(maxd.sum()) - reach))
    hi = np.minimum(cap, reach)
    opts = [np.flatnonzero(live[i]) for i in range(n)]
    if int(((hi - lo + 1) * live.sum(axis=1)).sum()) > _DP_WORK:
        return None
    e = np.where(live, e, np.inf)

    def rows(i0, i1, f, took):
        """Rows i0..i1-1 on f (valid up to hi[i0-1]); took[i] (choice per window state) if asked."""
        for i in range(i0, i1):
            lo_i, hi_i = int(lo[i]), int(hi[i])
            prev = int(hi[i - 1]) if i else 0
            if hi_i > prev:
                f[prev + 1 : hi_i + 1] = f[prev]  # beyond what rows so far reach: nothing more to buy
            new = np.full(hi_i - lo_i + 1, np.inf)
            arg = np.zeros(hi_i - lo_i + 1, dtype=np.int8) if took is not None else None
            for b in opts[i]:
                k = int(d[i, b])
                s0 = max(lo_i, k)
                if s0 > hi_i:
                    continue
                cand = f[s0 - k : hi_i + 1 - k] + e[i, b]
                seg = new[s0 - lo_i :]
                better = cand < seg
                np.copyto(seg, cand, where=better)
                if arg is not None:
                    np.copyto(arg[s0 - lo_i :], b, where=better)
            f[lo_i : hi_i + 1] = new
            if took is not None:
                took[i] = arg

    block = max(1, int(np.sqrt(n)))
    f = np.zeros(cap + 1)
    marks = {}
    for i0 in range(0, n, block):
        lo_p, hi_p = (int(lo[i0 - 1]), int(hi[i0 - 1])) if i0 else (0, 0)
        marks[i0] = (lo_p, f[lo_p : hi_p + 1].copy())
        rows(i0, min(i0 + block, n), f, None)
    pick = np.empty(n, dtype=np.int64)
    at = cap
    for i0 in sorted(marks, reverse=True):
        lo_p, saved = marks.pop(i0)
        f[lo_p : lo_p + saved.size] = saved
        took: dict[int, np.ndarray] = {}
        i1 = min(i0 + block, n)
        rows(i0, i1, f, took)
        for i in range(i1 - 1, i0 - 1, -1):
            at = min(at, int(hi[i]))  # past what rows 0..i reach, f is flat: same choice
            pick[i] = took[i][at - int(lo[i])]
            at -= int(d[i, pick[i]])
    return pick


def parse_layer_min_bits(items: list[str] | None) -> dict[str, int] | None:
    """["down_proj=3", ...] -> {"down_proj": 3}."""
    if not items:
        return None
    out = {}
    for item in items:
        pattern, sep, width = item.rpartition("=")
        if not sep or not pattern:
            raise BitsearchError(f"layer_min_bits '{item}' must look like REGEX=WIDTH, e.g. down_proj=3")
        try:
            out[pattern] = int(width)
        except ValueError:
            raise BitsearchError(f"layer_min_bits '{item}': width '{width}' is not an integer") from None
    return out


@register_allocator
class IlpAllocator(Allocator):
    name = "ilp"
    core_size = 256  # units of the heuristic core solve (the nearest to changing at the LP optimum)

    def __init__(
        self,
        granularity: str = "channel",
        share: list[str] | None = None,
        min_bits: dict[str, int] | None = None,
        time_limit: float | None = None,
        mip_rel_gap: float = 1e-6,
        solver: str = "auto",
    ):
        parse_granularity(granularity)  # fail early on a bad string
        if solver not in ("auto", "highs"):
            raise BitsearchError(f"ilp solver '{solver}' is not one of auto, highs")
        self.granularity = granularity
        self.share = list(share) if share else None
        self.min_bits = dict(min_bits) if min_bits else None
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap
        self.solver = solver
        self.last_info: dict = {}

    @classmethod
    def from_config(cls, config) -> "IlpAllocator":
        return cls(
            granularity=config.granularity,
            share=config.share or None,
            min_bits=parse_layer_min_bits(config.layer_min_bits),
            time_limit=config.time_limit,
        )

    def _left(self, t0):
        return None if self.time_limit is None else self.time_limit - (time.perf_counter() - t0)

    def _exact(self, es, cs, live, units, room, rel_gap, time_limit, cutoff=None):
        """Solve the sub-problem of ``units`` (their ``live`` options) within ``room``: by dynamic
        programming when its work is small (exact, deterministic time), else by HiGHS. Returns
        (option per unit or None, status, lower bound of the sub-problem, how, message)."""
        if self.solver == "auto":
            got = _knapsack_dp(es[units], cs[units], live[units], room)
            if got is not None:
                return got, "optimal", float(es[units, got].sum()), "dp", ""
        if time_limit is not None and time_limit < _HIGHS_SECONDS_PER_UNIT * units.size:
            return None, "time_limit", -np.inf, "none", "too little time left for HiGHS on this many units"
        got, res, scale = _solve(es, cs, live, units, room, rel_gap, time_limit, cutoff)
        msg = res.message.strip()
        if res.status not in (0, 1, 2):
            raise BitsearchError(f"the ILP solver failed ({msg})")
        if res.status == 2:  # nothing under the cutoff (within tolerances): the incumbent is the optimum
            return None, "optimal", cutoff if cutoff is not None else np.inf, "highs", msg
        dual = res.mip_dual_bound if res.mip_dual_bound is not None else np.nan
        bound = dual / scale if np.isfinite(dual) else -np.inf
        return got, "optimal" if res.status == 0 else "time_limit", bound, "highs", msg

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        t0 = time.perf_counter()
        problem.check_budget(budget_bytes)
        unit, n_units = unit_map(problem, self.granularity, self.share)
        e, c = unit_problem(problem, unit, n_units)
        bits = np.asarray(problem.bits)
        m = len(bits)
        rows = np.arange(n_units)
        idx = np.arange(m)
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
                f"smallest feasible one under the min_bits/share/granularity constraints: {need} bytes "
                f"({avg_bits(need, problem.n_weights):.4f} bits)"
            )

        # drop dominated options: another allowed one no dearer and no worse (ties: keep the lowest index)
        keep = allowed.copy()
        for a in range(m):
            ca, ea = c[:, a : a + 1], e[:, a : a + 1]
            better = (ca <= c) & (ea <= e) & ((ca < c) | (ea < e) | (a < idx[None, :])) & (idx[None, :] != a)
            keep &= ~(allowed[:, a : a + 1] & better)

        # shift every unit to its best error and cheapest bytes (constants: one option per unit)
        e_min = np.where(keep, e, np.inf).min(axis=1)
        c_min = np.where(keep, c, big).min(axis=1)
        es = np.where(keep, e - e_min[:, None], np.inf)
        cs = np.where(keep, c - c_min[:, None], 0)
        room = budget_bytes - problem.fixed_bytes - int(c_min.sum())
        base_err = float(e_min.sum())
        # every shifted cost is a multiple of their gcd (e.g. 32 bytes): so is every plan's, and the
        # bytes above the last multiple can never be spent. Rounding them off tightens the LP bound
        # a lot (it would otherwise "spend" them at the marginal rate).
        step = int(np.gcd.reduce(cs[cs > 0])) if (cs > 0).any() else 1
        room -= room % step

        best = np.where(es <= 0, cs, big).argmin(axis=1)  # least error, then cheapest
        if int(cs[rows, best].sum()) <= room:
            return self._finish(problem, budget_bytes, best[unit], "optimal", base_err, t0, n_units)

        # 1. incumbent: greedy on the unit problem (options not kept: dearer and worse than all, never
        #    taken); lower bound: the Lagrangian (= LP) bound
        unit_p = AllocationProblem(
            bits=problem.bits,
            errors=np.where(keep, es, 2 * es[keep].max() + 1),
            costs=np.where(keep, cs, cs.max() + 1),
            fixed_bytes=0,
            n_weights=problem.n_weights,
            layer_slices={},
            group_size=problem.group_size,
        )
        pick = GreedyAllocator().allocate(unit_p, room)
        upper = float(es[rows, pick].sum())
        lam, lower = _lagrangian(es, cs, room, unit_p.errors, unit_p.costs)
        lower = max(lower, 0.0)
        red = _reduced(es, cs, lam)
        info = {"greedy": upper + base_err}

        def tolerance():  # the absolute gap allowed: mip_rel_gap of the whole objective
            return self.mip_rel_gap * (upper + base_err)

        def part_gap(part):  # a relative gap on a part of objective ~part worth tolerance() on the whole
            return min(tolerance() / max(part, 1e-300), 1.0)

        def free_units():
            # reduced-cost fixing: a plan that takes an option of reduced cost r is worth at least
            # lower + r. Options with r > upper - lower - tol are in no plan better than upper - tol:
            # dropping them keeps every such plan, and if there is none the incumbent is within tol.
            live = keep & (red <= (upper - lower - tolerance()) + 1e-9 * upper)
            live[rows, pick] = True
            return live, np.flatnonzero(live.sum(axis=1) > 1)

        def consider(cand):
            nonlocal pick, upper
            cand, n = self._repair(cand, es, cs, keep, room)
            if float(es[rows, cand].sum()) < upper:
                pick, upper = cand, float(es[rows, cand].sum())
            return n

        # 2. better incumbent: the units nearest to changing at the LP optimum (least reduced cost of
        #    a second option), solved exactly with every other unit at its Lagrangian choice (which
        #    fits). It is nearly always the optimum, and with it 3. leaves far fewer units free.
        live, free = free_units()
        left = self._left(t0)
        if free.size > self.core_size and n_units > self.core_size and (left is None or left > 0):
            lam_fit = lam
            while True:  # the Lagrangian choice, cheapest on ties, fits (up to rounding: then nudge lambda)
                red_fit = _reduced(es, cs, lam_fit)
                at_fit = np.where(red_fit <= 0, cs, big).argmin(axis=1)
                if int(cs[rows, at_fit].sum()) <= room:
                    break
                lam_fit = lam_fit * (1 + 1e-9) + 1e-300
            near = np.where(keep & (idx[None, :] != at_fit[:, None]), red_fit, np.inf).min(axis=1)
            core = np.sort(np.argpartition(near, self.core_size)[: self.core_size])
            out = np.ones(n_units, dtype=bool)
            out[core] = False
            got, _, _, how, _ = self._exact(
                es,
                cs,
                keep,
                core,
                room - int(cs[out, at_fit[out]].sum()),
                min(1e-3 * part_gap(upper - float(es[out, at_fit[out]].sum())), 1.0),
                None if left is None else left / 2,
            )
            if got is not None:
                cand = at_fit.copy()
                cand[core] = got
                consider(cand)
            info["core"] = how
            live, free = free_units()
        info.update(core_incumbent=upper + base_err, lower=lower + base_err, n_free_units=int(free.size))

        # 3. the units still free, exactly; the others at their one live option
        status, bound = "optimal", max(lower, upper - tolerance())
        if free.size:
            fixed = np.ones(n_units, dtype=bool)
            fixed[free] = False
            only = np.where(live, 0, 1).argmin(axis=1)
            fixed_err = float(es[fixed, only[fixed]].sum())
            upper_before, tol_before = upper, tolerance()
            got, status, part_bound, info["solver"], msg = self._exact(
                es,
                cs,
                live,
                free,
                room - int(cs[fixed, only[fixed]].sum()),
                part_gap(upper - fixed_err),
                self._left(t0),
                cutoff=upper - fixed_err,
            )
            if msg:
                info["message"] = msg
            if got is not None:
                cand = only.copy()
                cand[free] = got
                info["repaired"] = consider(cand)
            # a bound of the reduced problem holds for the whole one only up to upper - tol
            bound = max(lower, min(part_bound + fixed_err, upper_before - tol_before))
        return self._finish(problem, budget_bytes, pick[unit], status, bound + base_err, t0, n_units, **info)

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

    def _finish(self, problem, budget_bytes, choice, status, bound, t0, n_units, **extra):
        used = problem.bytes_of(choice)
        assert used <= budget_bytes, f"ilp plan is over budget: {used} > {budget_bytes}"
        objective = problem.error_of(choice)
        bound = min(bound, objective)
        self.last_info = {
            "status": status,
            "gap": (objective - bound) / objective if objective > 0 else 0.0,
            "objective": objective,
            "bound": bound,
            "seconds": time.perf_counter() - t0,
            "n_units": n_units,
            "bytes": used,
            **extra,
        }
        return choice
