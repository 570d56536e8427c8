"""ILP allocator: exact against brute force at every granularity, shared widths, width floors,
the time-limit path, and greedy within 1 % of it on realistic curves."""

import itertools

import numpy as np
import pytest
from scipy.optimize import OptimizeResult
from test_greedy import brute_force, random_problem

from bitsearch.cost import row_bytes
from bitsearch.errors import BitsearchError
from bitsearch.search import get_allocator
from bitsearch.search import ilp as ilp_module
from bitsearch.search.ilp import IlpAllocator, unit_map
from bitsearch.search.problem import AllocationProblem


def exhaustive(p, groups, budget, allowed=None):
    """Least error over plans where every channel of a group takes one width (and only allowed ones)."""
    m = len(p.bits)
    combos = np.array(list(itertools.product(range(m), repeat=len(groups))))
    choice = np.zeros((len(combos), p.n_channels), dtype=np.int64)
    for g, rows in enumerate(groups):
        choice[:, rows] = combos[:, [g]]
    ch = np.arange(p.n_channels)
    ok = p.costs[ch, choice].sum(axis=1) + p.fixed_bytes <= budget
    if allowed is not None:
        ok &= allowed[ch, choice].all(axis=1)
    return p.errors[ch, choice].sum(axis=1)[ok].min()


def with_layers(p, sizes):
    """``p`` cut into consecutive layers {name: n_rows}."""
    assert sum(sizes.values()) == p.n_channels
    start, slices = 0, {}
    for name, n in sizes.items():
        slices[name] = slice(start, start + n)
        start += n
    p.layer_slices = slices
    return p


def budgets(p, k=7):
    return [int(b) for b in np.linspace(p.min_bytes(), p.max_useful_bytes(), k)]


def same_partition(unit, groups):
    return sorted(map(sorted, groups)) == sorted(sorted(np.flatnonzero(unit == u).tolist()) for u in np.unique(unit))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("convex", [False, True])
@pytest.mark.parametrize("solver", ["auto", "highs"])
def test_channel_granularity_equals_brute_force(seed, convex, solver):
    p = random_problem(seed, convex=convex)
    ilp = IlpAllocator(mip_rel_gap=0, solver=solver)
    for budget in budgets(p):
        choice = ilp.allocate(p, budget)
        assert p.bytes_of(choice) <= budget
        opt, _ = brute_force(p, budget)
        assert p.error_of(choice) == pytest.approx(opt, rel=0, abs=1e-9)
        assert ilp.last_info["status"] == "optimal" and ilp.last_info["gap"] <= 1e-9
        assert ilp.last_info.get("solver") in (None, "dp" if solver == "auto" else "highs")


@pytest.mark.parametrize(
    "granularity, groups",
    [
        ("group:2", [[0, 1], [2, 3], [4], [5, 6], [7]]),
        ("group:3", [[0, 1, 2], [3, 4], [5, 6, 7]]),
        ("layer", [[0, 1, 2, 3, 4], [5, 6, 7]]),
    ],
)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("solver", ["auto", "highs"])
def test_groups_and_layers_equal_brute_force(granularity, groups, seed, solver):
    p = with_layers(random_problem(seed, n=8), {"a": 5, "b": 3})
    unit, n_units = unit_map(p, granularity, None)
    assert n_units == len(groups) and same_partition(unit, groups)
    ilp = IlpAllocator(granularity=granularity, mip_rel_gap=0, solver=solver)
    for budget in budgets(p):
        choice = ilp.allocate(p, budget)
        assert p.bytes_of(choice) <= budget
        for g in groups:
            assert len(set(choice[g].tolist())) == 1
        assert p.error_of(choice) == pytest.approx(exhaustive(p, groups, budget), rel=0, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("solver", ["auto", "highs"])
def test_core_step_equals_brute_force(seed, solver, monkeypatch):
    """With a core smaller than the problem, the heuristic core solve and the reduced-cost fixing
    run on a brute-forceable problem (and tied, equal channels stress the HiGHS class merging)."""
    monkeypatch.setattr(IlpAllocator, "core_size", 2)
    p = random_problem(seed, n=6, convex=seed % 2 == 1)
    p.errors[3], p.costs[3] = p.errors[2], p.costs[2]  # two identical channels
    ilp = IlpAllocator(mip_rel_gap=0, solver=solver)
    cores = 0
    for budget in budgets(p, 9):
        choice = ilp.allocate(p, budget)
        assert p.bytes_of(choice) <= budget
        assert p.error_of(choice) == pytest.approx(exhaustive(p, [[i] for i in range(6)], budget), rel=0, abs=1e-9)
        cores += "core" in ilp.last_info
    assert cores > 0


@pytest.mark.parametrize("seed", range(3))
def test_shared_widths_tie_layers_index_by_index(seed):
    p = with_layers(random_problem(seed, n=8), {"b0.q": 2, "b0.k": 2, "b0.o": 2, "b1.q": 1, "b1.k": 1})
    share = [r"^(b\d+)\.[qk]$"]
    groups = [[0, 2], [1, 3], [4], [5], [6, 7]]
    unit, n_units = unit_map(p, "channel", share)
    assert n_units == 5 and same_partition(unit, groups)
    ilp = IlpAllocator(share=share, mip_rel_gap=0)
    for budget in budgets(p):
        choice = ilp.allocate(p, budget)
        assert p.bytes_of(choice) <= budget
        assert (choice[0:2] == choice[2:4]).all() and choice[6] == choice[7]
        assert p.error_of(choice) == pytest.approx(exhaustive(p, groups, budget), rel=0, abs=1e-9)
    # at layer granularity a set is one width
    layer_groups = [[0, 1, 2, 3], [4, 5], [6, 7]]
    unit, _ = unit_map(p, "layer", share)
    assert same_partition(unit, layer_groups)
    ilp = IlpAllocator(granularity="layer", share=share, mip_rel_gap=0)
    for budget in budgets(p):
        choice = ilp.allocate(p, budget)
        assert len(set(choice[:4].tolist())) == 1
        assert p.error_of(choice) == pytest.approx(exhaustive(p, layer_groups, budget), rel=0, abs=1e-9)


def test_share_errors_are_one_line():
    p = with_layers(random_problem(0, n=5), {"b0.q": 3, "b0.k": 2})
    with pytest.raises(BitsearchError, match=r"share pattern .* \('b0'\) .*b0\.q: 3, b0\.k: 2") as exc:
        IlpAllocator(share=[r"^(b\d+)\.[qk]$"]).allocate(p, p.max_useful_bytes())
    assert "\n" not in str(exc.value)
    assert (IlpAllocator(granularity="layer", share=[r"^(b\d+)\.[qk]$"]).allocate(p, p.max_useful_bytes()) >= 0).all()
    for bad in [r"^b\d+\.[qk]$", r"^(b\d+)\.(q|k)$", "("]:
        with pytest.raises(BitsearchError) as exc:
            IlpAllocator(share=[bad]).allocate(p, p.max_useful_bytes())
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("seed", range(3))
def test_min_bits_respected_and_optimal(seed):
    p = with_layers(random_problem(seed, n=6), {"x.down_proj": 3, "x.up_proj": 3})
    floors = {"down_proj": 3}
    allowed = np.ones_like(p.costs, dtype=bool)
    allowed[:3] = np.asarray(p.bits)[None, :] >= 3
    need = int(np.where(allowed, p.costs, 1 << 40).min(axis=1).sum()) + p.fixed_bytes
    ilp = IlpAllocator(min_bits=floors, mip_rel_gap=0)
    for budget in np.linspace(need, p.max_useful_bytes(), 7).astype(int):
        choice = ilp.allocate(p, int(budget))
        assert p.bytes_of(choice) <= budget
        assert (np.asarray(p.bits)[choice[:3]] >= 3).all()
        groups = [[i] for i in range(6)]
        assert p.error_of(choice) == pytest.approx(exhaustive(p, groups, budget, allowed), rel=0, abs=1e-9)
    assert need > p.min_bytes()  # feasible without the floor, not with it
    with pytest.raises(BitsearchError, match=f"min_bits/share/granularity constraints: {need} bytes") as exc:
        ilp.allocate(p, need - 1)
    assert "\n" not in str(exc.value)
    with pytest.raises(BitsearchError, match="leaves layer x.down_proj no width"):
        IlpAllocator(min_bits={"down": 16}).allocate(p, p.max_useful_bytes())


@pytest.mark.parametrize("bad", ["group:0", "group:", "group:x", "group:-2", "blocks", "Channel", ""])
def test_bad_granularity(bad):
    with pytest.raises(BitsearchError, match="granularity") as exc:
        IlpAllocator(granularity=bad)
    assert "\n" not in str(exc.value)


def realistic_problem(seed, shapes, bits=(2, 3, 4, 5, 6, 8), group_size=128, noise=0.1):
    """Curves like measured ones: e_c(b) = s_c * 4^-b (times +-noise), s_c log-normal per channel and
    per layer; exact byte costs ceil(K*b/8) + 3 per group of ``group_size`` inputs."""
    rng = np.random.default_rng(seed)
    errors, costs, slices, start = [], [], {}, 0
    for name, (rows, k) in shapes.items():
        s = rng.lognormal(0, 1, size=(rows, 1)) * rng.lognormal(0, 1)
        e = s * 4.0 ** -np.asarray(bits, float)[None, :] * rng.uniform(1 - noise, 1 + noise, size=(rows, len(bits)))
        errors.append(np.sort(e, axis=1)[:, ::-1])
        costs.append(np.tile([row_bytes(k, b, group_size) for b in bits], (rows, 1)))
        slices[name] = slice(start, start + rows)
        start += rows
    return AllocationProblem(
        bits=list(bits),
        errors=np.concatenate(errors),
        costs=np.concatenate(costs).astype(np.int64),
        fixed_bytes=start,
        n_weights=sum(r * k for r, k in shapes.values()),
        layer_slices=slices,
        group_size=group_size,
    )


def block_shapes(n_blocks, hidden, inter):
    shapes = {}
    for i in range(n_blocks):
        shapes.update(
            {
                f"b{i}.q": (hidden, hidden),
                f"b{i}.k": (hidden // 4, hidden),
                f"b{i}.v": (hidden // 4, hidden),
                f"b{i}.o": (hidden, hidden),
                f"b{i}.gate": (inter, hidden),
                f"b{i}.up": (inter, hidden),
                f"b{i}.down": (hidden, inter),
            }
        )
    return shapes


GREEDY_CASES = [  # (seed, blocks, hidden, intermediate, menu): 480 to 3840 channels
    (0, 1, 64, 128, (2, 3, 4, 5, 6, 8)),
    (1, 2, 128, 352, (2, 3, 4, 5, 6, 8)),
    (2, 2, 256, 512, (0, 2, 3, 4, 5, 6, 8)),
    (3, 1, 512, 1024, (2, 3, 4, 8)),
]


@pytest.mark.parametrize("seed, blocks, hidden, inter, menu", GREEDY_CASES)
def test_greedy_within_one_percent_of_ilp(seed, blocks, hidden, inter, menu):
    p = realistic_problem(seed, block_shapes(blocks, hidden, inter), bits=menu)
    greedy, ilp = get_allocator("greedy"), IlpAllocator()
    worst = 1.0
    for avg in [1.5, 2.25, 2.5, 3.0, 3.5, 4.25, 5.0, 6.0]:
        budget = int(avg * p.n_weights / 8)
        if budget < p.min_bytes():
            continue
        g, x = greedy.allocate(p, budget), ilp.allocate(p, budget)
        assert p.bytes_of(x) <= budget and p.bytes_of(g) <= budget
        assert ilp.last_info["status"] == "optimal"
        assert p.error_of(x) <= p.error_of(g) * (1 + 1e-9)  # the ILP is never worse
        worst = max(worst, p.error_of(g) / p.error_of(x))
        assert p.error_of(g) <= 1.01 * p.error_of(x)
    print(f"worst greedy/ilp {worst:.6f}")


def test_time_limit_returns_best_plan_found(monkeypatch):
    """A solver stopped by its time limit without a plan: the incumbent (greedy or better) comes back,
    within budget, with the gap to the Lagrangian bound recorded."""
    p = realistic_problem(5, block_shapes(1, 64, 128), bits=(2, 3, 4, 5, 6, 8), noise=0.3)
    budget = int(3.1 * p.n_weights / 8)
    exact = IlpAllocator(mip_rel_gap=0)
    opt = p.error_of(exact.allocate(p, budget))
    assert exact.last_info["n_free_units"] > 0  # a solver is needed on this problem
    calls = []

    def stopped(*args, **kwargs):
        calls.append(kwargs["options"])
        return OptimizeResult(
            status=1,
            x=None,
            fun=None,
            message="Time limit reached",
            mip_dual_bound=None,
            mip_gap=None,
            mip_node_count=0,
            success=False,
        )

    monkeypatch.setattr(ilp_module, "milp", stopped)
    ilp = IlpAllocator(time_limit=30, mip_rel_gap=0, solver="highs")
    choice = ilp.allocate(p, budget)
    info = ilp.last_info
    assert calls and all(0 < o["time_limit"] <= 30 for o in calls)
    assert p.bytes_of(choice) <= budget
    assert info["status"] == "time_limit"
    assert info["objective"] == pytest.approx(p.error_of(choice))
    assert info["objective"] >= opt - 1e-12 and info["objective"] <= info["greedy"] + 1e-12
    assert 0 <= info["bound"] <= opt + 1e-12
    assert info["gap"] == pytest.approx((info["objective"] - info["bound"]) / info["objective"])
    assert set(info) >= {"status", "gap", "objective", "seconds"}


def test_registered_and_generous_budget():
    from bitsearch.search import ALLOCATORS

    assert ALLOCATORS["ilp"] is IlpAllocator
    p = random_problem(3)
    choice = IlpAllocator().allocate(p, p.max_useful_bytes())
    assert choice.tolist() == p.errors.argmin(axis=1).tolist()
    with pytest.raises(BitsearchError, match="smallest feasible one"):
        IlpAllocator().allocate(p, p.min_bytes() - 1)
