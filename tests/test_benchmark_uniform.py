"""studies/benchmark.py's uniform bitsearch pipelines: the (width, group) pair they get is the
largest that fits the budget by bitsearch's byte count, checked against that count written out."""

import math

import pytest

from bitsearch.cost import budget_to_bytes
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets
from studies import benchmark


def stored(shapes, w, g):
    """Codes, a float16 scale and a uint8 zero per row and group, one width byte per row."""
    return sum(r * (math.ceil(k * w / 8) + 3 * math.ceil(k / g) + 1) for r, k in shapes)


def bench_for(model_dir, limit=None):
    """A Bench with only what choosing a configuration needs: the model, its shapes, the budget."""
    bench = benchmark.Bench.__new__(benchmark.Bench)
    bench.fresh = lambda: load_model(model_dir, "cpu", "float32")
    bench.shapes = [(t.out_features, t.in_features) for t in find_targets(bench.fresh())]
    n = sum(r * k for r, k in bench.shapes)
    bench.budget_bytes = (lambda b: budget_to_bytes(b, n)) if limit is None else (lambda b: limit)
    return bench


@pytest.mark.parametrize("budget", [2.6, 2.8, 3.3, 4.5, 8.6])
def test_uniform_plan_is_the_largest_pair_that_fits(llama_dir, budget):
    bench = bench_for(llama_dir)
    shapes = bench.shapes
    n = sum(r * k for r, k in shapes)
    plan, secs, m = benchmark.uniform_bitsearch_plan(bench, budget)
    limit = budget_to_bytes(budget, n)
    fits = {
        (w, g): stored(shapes, w, g)
        for w in benchmark.WIDTHS
        for g in benchmark.GROUPS
        if stored(shapes, w, g) <= limit
    }
    best = max(fits.values())
    widths = {int(b) for bits in plan.bits.values() for b in bits}
    assert len(widths) == 1 and plan.n_bytes() == best == fits[(widths.pop(), plan.group_size)]
    assert secs == 0.0 and {t.name for t in find_targets(m)} == set(plan.bits)


def test_uniform_plan_below_every_pair_is_skipped(llama_dir):
    bench = bench_for(llama_dir, limit=10)
    with pytest.raises(benchmark.Skip, match="no uniform configuration fits 1.0 bits"):
        benchmark.uniform_bitsearch_plan(bench, 1.0)
