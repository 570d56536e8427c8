"""Greedy Lagrangian allocator against brute force on small problems."""

import itertools

import numpy as np
import pytest

from bitsearch.errors import BitsearchError
from bitsearch.search import get_allocator
from bitsearch.search.greedy import hull_segments
from bitsearch.search.problem import AllocationProblem
from studies.reference.greedy_walk import fill_walking_every_segment


def random_problem(seed, n=5, bits=(0, 2, 3, 4, 8), convex=False):
    rng = np.random.default_rng(seed)
    k = rng.integers(4, 12, size=n) * 8
    costs = np.array([[0 if b == 0 else ki * b // 8 + 4 for b in bits] for ki in k], dtype=np.int64)
    base = rng.uniform(0.1, 10, size=(n, 1))
    if convex:
        errors = base * np.array([4.0 ** -(b / 1.0) if b else 3.0 for b in bits])[None, :]
    else:
        errors = np.sort(rng.uniform(0, 10, size=(n, len(bits))), axis=1)[:, ::-1] * base
    return AllocationProblem(
        bits=list(bits),
        errors=errors,
        costs=costs,
        fixed_bytes=n,
        n_weights=int(k.sum()),
        layer_slices={"l": slice(0, n)},
        group_size=-1,
    )


def brute_force(p, budget):
    best = (np.inf, None)
    for choice in itertools.product(range(len(p.bits)), repeat=p.n_channels):
        c = np.array(choice)
        if p.bytes_of(c) <= budget:
            best = min(best, (p.error_of(c), tuple(c)), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("seed", range(8))
def test_never_over_budget_and_close_to_optimum(seed):
    p = random_problem(seed)
    greedy = get_allocator("greedy")
    lo, hi = p.min_bytes(), p.max_useful_bytes()
    for budget in np.linspace(lo, hi, 9).astype(int):
        choice = greedy.allocate(p, int(budget))
        assert p.bytes_of(choice) <= budget
        opt, _ = brute_force(p, budget)
        assert p.error_of(choice) >= opt - 1e-9
        # Lagrangian gap: at most one channel's largest single hull step from the optimum
        assert p.error_of(choice) - opt <= p.errors.max() + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_exact_at_hull_breakpoints(seed):
    p = random_problem(seed, convex=True)
    start, ch, to, dc, de, step = hull_segments(p.costs, p.errors)
    order = np.lexsort((step, de / dc))
    base = p.bytes_of(start)
    greedy = get_allocator("greedy")
    for k in range(len(order) + 1):
        budget = base + int(dc[order[:k]].sum())
        choice = greedy.allocate(p, budget)
        opt, _ = brute_force(p, budget)
        assert p.error_of(choice) == pytest.approx(opt, rel=1e-12, abs=1e-12)


def test_hull_drops_non_convex_points():
    costs = np.array([[0, 10, 20, 30]])
    errors = np.array([[10.0, 9.5, 2.0, 1.0]])  # option 1 lies above the chord 0 -> 2
    start, ch, to, dc, de, step = hull_segments(costs, errors)
    assert start.tolist() == [0] and to.tolist() == [2, 3]


def test_budget_below_minimum_names_the_minimum():
    p = random_problem(0, bits=(2, 3, 4))
    with pytest.raises(BitsearchError, match=f"smallest feasible one with widths >= 2: {p.min_bytes()} bytes"):
        get_allocator("greedy").allocate(p, p.min_bytes() - 1)


def test_uniform_picks_widest_fitting_width():
    p = random_problem(1, bits=(2, 3, 4, 8))
    uni = get_allocator("uniform")
    budget = p.bytes_of(np.full(p.n_channels, 2))  # exactly the 4-bit cost
    choice = uni.allocate(p, budget)
    assert (choice == 2).all()
    assert (uni.allocate(p, budget - 1) == 1).all()


def test_unknown_method():
    with pytest.raises(BitsearchError, match="unknown search method"):
        get_allocator("nope")


@pytest.mark.parametrize("seed", range(6))
def test_fill_equals_walking_every_segment(seed):
    """The fill that visits only fitting segments picks exactly what the full walk picked."""
    p = random_problem(seed, n=400, bits=(0, 2, 3, 4, 5, 6, 8))
    greedy = get_allocator("greedy")
    rng = np.random.default_rng(seed)
    lo, hi = p.min_bytes(), p.max_useful_bytes()
    for budget in list(rng.integers(lo, hi, size=25)) + [lo, hi]:
        np.testing.assert_array_equal(greedy.allocate(p, int(budget)), fill_walking_every_segment(p, int(budget)))
