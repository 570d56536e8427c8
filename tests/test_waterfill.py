"""Reverse water-filling (the ``snr`` allocator) against brute force: among plans within the
budget it minimizes the largest channel error, and it never goes over budget."""

import itertools

import numpy as np
import pytest
from test_greedy import random_problem

from bitsearch.search import get_allocator
from bitsearch.search.waterfill import waterfill_choice


def brute_min_max(p, budget):
    best = np.inf
    for choice in itertools.product(range(len(p.bits)), repeat=p.n_channels):
        c = np.array(choice)
        if p.bytes_of(c) <= budget:
            best = min(best, p.errors[np.arange(p.n_channels), c].max())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_waterfill_minimizes_the_largest_error(seed):
    p = random_problem(seed)
    wf = get_allocator("snr")
    for budget in np.linspace(p.min_bytes(), p.max_useful_bytes(), 7).astype(int):
        choice = wf.allocate(p, int(budget))
        assert p.bytes_of(choice) <= budget
        worst = p.errors[np.arange(p.n_channels), choice].max()
        assert worst == pytest.approx(brute_min_max(p, budget), rel=1e-12)


def test_water_level_prunes_weak_channels():
    """Channels whose signal (error at 0 bits) is below the water level get 0 bits."""
    bits = [0, 2, 4, 8]
    signal = np.array([1e-6, 1.0, 100.0])
    errors = signal[:, None] * np.array([1.0, 4.0**-2, 4.0**-4, 4.0**-8])[None, :]
    from bitsearch.search.problem import AllocationProblem

    costs = np.tile([0, 10, 20, 40], (3, 1)).astype(np.int64)
    p = AllocationProblem(
        bits=bits,
        errors=errors,
        costs=costs,
        fixed_bytes=0,
        n_weights=120,
        layer_slices={"l": slice(0, 3)},
        group_size=-1,
    )
    choice = waterfill_choice(p, 1e-2)
    assert bits[choice[0]] == 0  # below the level: pruned
    assert errors[1, choice[1]] <= 1e-2 and errors[2, choice[2]] <= 1e-2
    assert bits[choice[2]] > bits[choice[1]]  # stronger signal, more bits at the same noise
