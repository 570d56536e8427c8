"""Coupled pruning: detection, cost, the allocator, and physically smaller matrices in apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsearch.cost import plan_bytes, row_bytes
from bitsearch.couplings import find_couplings, live_columns
from bitsearch.io.checkpoint import load_packed, packed_tensor_bytes, save_packed
from bitsearch.io.loading import load_model
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.quantize import fake_quantize_model, pack_model
from bitsearch.search import get_allocator
from bitsearch.search.coupled import allocate_coupled
from bitsearch.search.problem import AllocationProblem

GS = 32


def _couplings(model):
    return find_couplings(model, [t.name for t in find_targets(model)])


@pytest.mark.parametrize(
    "arch,kinds",
    [
        ("llama", {"mlp", "attention"}),
        ("mistral", {"mlp", "attention"}),
        ("qwen2", {"mlp"}),
        ("gpt_neox", set()),
        ("opt", set()),
    ],
)
def test_find_couplings(tiny_models, arch, kinds):
    model = load_model(tiny_models[arch])
    cs = _couplings(model)
    assert {c.kind for c in cs} == kinds
    assert len(cs) == 2 * len(kinds)  # two blocks
    for c in cs:
        if c.kind == "attention":  # 4 query heads of 16 dims over 2 key-value heads
            assert c.n_units == 2 and c.unit_rows == (32, 16, 16) and c.unit_cols == 32
        else:
            assert c.n_units == 128 and c.unit_rows == (1, 1) and c.unit_cols == 1


def _plan_with_dead_units(model, rng) -> BitPlan:
    targets = find_targets(model)
    cs = _couplings(model)
    bits = {t.name: rng.choice([2, 3, 4, 8, 16], size=t.out_features).astype(np.uint8) for t in targets}
    for c in cs:
        dead = rng.random(c.n_units) < 0.4
        dead[0] = c.kind == "attention"  # one dead head group, one alive
        dead[-1] = False
        for p, name in enumerate(c.producers):
            bits[name][np.repeat(dead, c.unit_rows[p])] = 0
        # a lone pruned producer row of an alive unit stays an ordinary pruned row
        if c.kind == "mlp":
            bits[c.producers[0]][np.flatnonzero(~dead)[0]] = 0
    plan = BitPlan(
        model=model_fingerprint(model, targets), group_size=GS, menu=[0, 2, 3, 4, 8, 16], bits=bits, couplings=cs
    )
    plan.fill_summary()
    return plan


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_apply_writes_smaller_matrices_with_the_masked_outputs(tiny_models, tmp_path, arch):
    rng = np.random.default_rng(0)
    model = load_model(tiny_models[arch])
    plan = _plan_with_dead_units(model, rng)
    assert plan.summary["dead_units"] > 0
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = BitPlan.load(str(path))
    assert loaded.n_bytes() == plan.n_bytes() and len(loaded.couplings) == len(plan.couplings)
    # the consumer's freed columns are not paid for
    shapes = plan.shapes
    assert plan.n_bytes() < plan_bytes(shapes, plan.bits, GS)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    masked = fake_quantize_model(load_model(tiny_models[arch]), plan)
    with torch.no_grad():
        ref = masked(input_ids=ids).logits
    save_packed(load_model(tiny_models[arch]), plan, str(tmp_path / "packed"))
    assert packed_tensor_bytes(str(tmp_path / "packed")) == plan.n_bytes()
    for packed in (pack_model(load_model(tiny_models[arch]), plan), load_packed(str(tmp_path / "packed"))):
        mods = dict(packed.named_modules())
        for c in plan.couplings:
            live = live_columns(c, plan.bits)
            assert mods[c.consumer].dequantized_weight().shape[1] == live.sum() < live.size
            dead = c.dead_units(plan.bits)
            for p, name in enumerate(c.producers):
                w = mods[name].dequantized_weight()
                assert w.shape[0] == int((~dead).sum()) * c.unit_rows[p] < plan.bits[name].size
        with torch.no_grad():
            out = packed(input_ids=ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _synthetic_problem(rng, model):
    """Curves e(b) = s 4^-b per row, e(0) given, exact byte costs, over the model's targets."""
    targets = find_targets(model)
    menu = [0, 2, 3, 4, 8]
    errors, costs, slices, start = [], [], {}, 0
    for t in targets:
        s = rng.lognormal(0, 1, t.out_features)
        e = s[:, None] * 4.0 ** -np.array(menu, dtype=float)
        e[:, 0] = s * rng.uniform(0.02, 3.0, t.out_features)
        errors.append(e)
        costs.append(np.tile([row_bytes(t.in_features, b, GS) for b in menu], (t.out_features, 1)))
        slices[t.name] = slice(start, start + t.out_features)
        start += t.out_features
    problem = AllocationProblem(
        bits=menu,
        errors=np.concatenate(errors),
        costs=np.concatenate(costs),
        fixed_bytes=start,
        n_weights=sum(t.numel for t in targets),
        layer_slices=slices,
        group_size=GS,
    )
    return problem, {t.name: (t.out_features, t.in_features) for t in targets}


@pytest.mark.parametrize("method", ["greedy", "ilp"])
def test_coupled_allocation_within_budget_and_prunes_where_it_pays(tiny_models, method):
    rng = np.random.default_rng(1)
    model = load_model(tiny_models["llama"])
    cs = _couplings(model)
    problem, shapes = _synthetic_problem(rng, model)
    allocator = get_allocator(method)
    for avg in (1.6, 2.0, 2.3, 3.0):
        budget = int(avg * problem.n_weights / 8)
        widths, loss, info = allocate_coupled(problem, allocator, budget, cs, shapes)
        assert plan_bytes(shapes, widths, GS, cs) <= budget
        # producer rows are pruned only as whole units
        for c in cs:
            dead = c.dead_units(widths)
            for p, name in enumerate(c.producers):
                assert np.array_equal(widths[name] == 0, np.repeat(dead, c.unit_rows[p]))
        # never predicts worse than the plan without pruning (when that one fits)
        no_prune = AllocationProblem(
            bits=problem.bits[1:],
            errors=problem.errors[:, 1:],
            costs=problem.costs[:, 1:],
            fixed_bytes=problem.fixed_bytes,
            n_weights=problem.n_weights,
            layer_slices=problem.layer_slices,
            group_size=GS,
        )
        if no_prune.min_bytes() <= budget:
            assert loss <= no_prune.error_of(allocator.allocate(no_prune, budget)) * (1 + 1e-9)
        if avg <= 2.0:  # below 2 bits of quantized rows, only pruning can pay
            assert info["dead_units"] > 0


def test_coupled_allocation_prunes_the_cheap_units(tiny_models):
    """Units whose pruning costs (almost) nothing die first; costly ones stay."""
    rng = np.random.default_rng(2)
    model = load_model(tiny_models["llama"])
    cs = [c for c in _couplings(model) if c.kind == "mlp"]
    problem, shapes = _synthetic_problem(rng, model)
    c = cs[0]
    cheap = np.zeros(c.n_units, dtype=bool)
    cheap[:16] = True
    for name in c.producers:
        e = problem.errors[problem.layer_slices[name]]
        e[cheap, 0] = 1e-9
        e[~cheap, 0] = 1e3
    budget = int(2.6 * problem.n_weights / 8)
    widths, _, info = allocate_coupled(problem, get_allocator("greedy"), budget, cs, shapes)
    dead = c.dead_units(widths)
    assert dead[cheap].all() and not dead[~cheap].any()
