"""diffq: the noisy-width surrogate's gradient against finite differences, rounding that lands on
the learned widths exactly within budget, closed gates as pruning, and the search end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitsearch import api
from bitsearch.config import SearchConfig
from bitsearch.errors import BitsearchError
from bitsearch.models import find_targets
from bitsearch.search.diffq import NoisyWidths, rounding_problem
from bitsearch.search.greedy import GreedyAllocator
from bitsearch.search.problem import AllocationProblem

SMALL = dict(samples=4, seq_len=32, group_size=16, loss_calibration_samples=2, show_progress=False)


def _noisy_kl(m, nw, targets, size_weight: float = 0.0):
    """KL(float || noisy model) on a fixed input and fixed noise (+ size_weight * bytes), as a
    function of nw's parameters only (the model's weights frozen); float64 throughout."""
    from torch.func import functional_call

    torch.manual_seed(0)
    x = torch.randint(0, 32, (2, 12))
    noise = {t.name: torch.rand(t.out_features, t.in_features, dtype=torch.float64) - 0.5 for t in targets}
    with torch.no_grad():
        ref = F.log_softmax(m(input_ids=x).logits, -1)
    for p in m.parameters():
        p.requires_grad_(False)

    def loss():
        subs = {f"{t.name}.weight": nw.noisy_weight(t.name, noise[t.name]) for t in targets}
        lp = F.log_softmax(functional_call(m, subs, args=(), kwargs={"input_ids": x}).logits, -1)
        size = nw.size_bytes({t.name: 3.0 for t in targets}, 0)
        return (ref.exp() * (ref - lp)).sum(-1).mean() + size_weight * size

    return loss


def _assert_gradient_is_central_difference(loss, param, idx=()):
    """param.grad[idx] (after loss().backward()) against a central difference of loss()."""
    g, eps = float(param.grad[idx]), 1e-5
    with torch.no_grad():
        param[idx] += eps
        up = float(loss())
        param[idx] -= 2 * eps
        down = float(loss())
        param[idx] += eps
    assert g == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-10) and abs(g) > 0


def test_surrogate_gradient_matches_finite_differences():
    from exact_models import tiny_llama

    m = tiny_llama()  # float64 throughout (HF's RMSNorm would compute in float32)
    targets = find_targets(m)[:3]
    init = {t.name: np.full(t.out_features, 3.0) for t in targets}
    nw = NoisyWidths(m, targets, 4, [0, 2, 3, 4, 8], init).double()
    loss = _noisy_kl(m, nw, targets, size_weight=1e-6)
    key = nw._key(targets[1].name)
    loss().backward()
    for param, idx in [(nw.logits[key], 3), (nw.gates[key], 5)]:
        _assert_gradient_is_central_difference(loss, param, idx)


def _problem(n=40, k=64, bits=(0, 2, 3, 4, 8), seed=1):
    """Random decreasing error curves (pruning the most expensive), 2 layers of n/2 channels."""
    costs = np.array([[0 if b == 0 else k * b // 8 + 3 for b in bits]] * n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    errors = np.sort(rng.random((n, len(bits))), axis=1)[:, ::-1] * rng.random((n, 1)) * 10
    return AllocationProblem(
        bits=list(bits),
        errors=errors,
        costs=costs,
        fixed_bytes=n,
        n_weights=n * k,
        layer_slices={"a": slice(0, n // 2), "b": slice(n // 2, n)},
        group_size=-1,
    )


def test_corrected_curves_start_at_greedy_and_follow_the_learned_moves():
    p = _problem()
    budget = int(p.costs[:, 2].sum() + p.fixed_bytes)  # about 3 bits a channel
    greedy = GreedyAllocator().allocate(p, budget)
    start = {n: np.asarray(w, float) for n, w in p.widths(greedy).items()}
    closed = {n: np.zeros(20, bool) for n in ("a", "b")}
    same = rounding_problem(p, start, closed, start)
    assert (GreedyAllocator().allocate(same, budget) == greedy).all()
    moved = {n: v.copy() for n, v in start.items()}
    moved["a"][:4] += 3.0  # training wants these much wider
    got = rounding_problem(p, moved, closed, start)
    widths = got.widths(GreedyAllocator().allocate(got, budget))
    assert (widths["a"][:4] > start["a"][:4]).all() or (start["a"][:4] == 8).all()
    assert p.bytes_of(GreedyAllocator().allocate(got, budget)) <= budget


def test_closed_gates_are_pruned():
    p = _problem()
    learned = {n: np.full(20, 3.0) for n in ("a", "b")}
    closed = {"a": np.arange(20) < 5, "b": np.zeros(20, bool)}
    rp = rounding_problem(p, learned, closed, learned)
    got = GreedyAllocator().allocate(rp, p.max_useful_bytes())
    widths = rp.widths(got)
    assert (widths["a"][:5] == 0).all() and (widths["a"][5:] > 0).all() and (widths["b"] > 0).all()


def test_diffq_search_end_to_end(llama_dir, text_file):
    plan = api.search(llama_dir, text_file, SearchConfig(budget="4.5", method="diffq", steps=4, kl_samples=2, **SMALL))
    assert plan.summary["avg_bits"] <= 4.5 and plan.provenance["allocator"] == "diffq"
    assert plan.provenance["steps"] == 4 and np.isfinite(plan.provenance["final_kl"])
    # the greedy warm start and roundings at 4 points of training, the lowest held-out KL chosen
    val = plan.provenance["validation_kl_by_step"]
    assert set(val) == {"0", "1", "2", "3", "4"}
    assert val[str(plan.provenance["chosen_step"])] == min(val.values())


def test_layer_learning_trains_one_shift_per_layer_and_keeps_the_ranking():
    from exact_models import tiny_llama

    m = tiny_llama()
    targets = find_targets(m)[:3]
    rng = np.random.default_rng(0)
    init = {t.name: rng.choice([2.0, 3.0, 4.0], t.out_features) for t in targets}
    nw = NoisyWidths(m, targets, 4, [2, 3, 4, 8], init, learn="layer").double()
    trainable = [p for p in nw.parameters() if p.requires_grad]
    assert len(trainable) == len(targets) and all(p.ndim == 0 for p in trainable)
    before = {t.name: nw.widths(t.name).detach().clone() for t in targets}
    loss = _noisy_kl(m, nw, targets)
    shift = nw.shifts[nw._key(targets[1].name)]
    loss().backward()
    _assert_gradient_is_central_difference(loss, shift)
    with torch.no_grad():
        shift += 1.5
    after = nw.widths(targets[1].name).detach()
    b0 = before[targets[1].name]
    assert (after > b0).all()  # the whole layer moved up
    order = torch.argsort(b0, stable=True)
    assert (after[order].diff() >= -1e-12).all()  # and kept its channels' ranking
    assert torch.equal(nw.widths(targets[0].name).detach(), before[targets[0].name])


def test_diffq_layer_search_end_to_end(llama_dir, text_file):
    plan = api.search(
        llama_dir,
        text_file,
        SearchConfig(budget="4.5", method="diffq", steps=3, kl_samples=2, learn="layer", relax="noise", **SMALL),
    )
    assert (
        plan.summary["avg_bits"] <= 4.5 and plan.provenance["learn"] == "layer" and plan.provenance["relax"] == "noise"
    )
    with pytest.raises(BitsearchError, match="learn and relax are options of the diffq method"):
        api.search(llama_dir, text_file, SearchConfig(budget="3.5", method="greedy", learn="layer", **SMALL))


def _rtn_widths(m, targets, menu, init):
    return NoisyWidths(m, targets, 4, menu, init, relax="rtn").double()


def test_rtn_relaxation_is_round_to_nearest_at_menu_widths_and_interpolates_between():
    from exact_models import tiny_llama

    from bitsearch.quant.grid import fake_quantize

    m = tiny_llama()
    targets = find_targets(m)[:2]
    rng = np.random.default_rng(0)
    init = {t.name: rng.choice([2.0, 3.0, 4.0, 8.0], t.out_features) for t in targets}
    nw = _rtn_widths(m, targets, [0, 2, 3, 4, 8], init)
    t = targets[1]
    w = m.get_submodule(t.name).weight.detach()
    with torch.no_grad():
        nw.gates[nw._key(t.name)].fill_(60.0)  # gates fully open: g = 1
        for b in (2, 3, 4, 8):  # every row exactly at width b
            nw.logits[nw._key(t.name)].fill_(
                float(np.log((b - 2) / (8 - b))) if 2 < b < 8 else (-60.0 if b == 2 else 60.0)
            )
            assert torch.allclose(nw.interpolated_weight(t.name), fake_quantize(w, b, 4), atol=1e-12)
        p = torch.tensor(1.0 / 6 + 0.25 / 6, dtype=torch.float64)  # b = 2 + 6p = 3.25: between 3 and 4
        nw.logits[nw._key(t.name)].fill_(float(torch.log(p / (1 - p))))
        mid = 0.75 * fake_quantize(w, 3, 4) + 0.25 * fake_quantize(w, 4, 4)
        assert torch.allclose(nw.interpolated_weight(t.name), mid, atol=1e-12)


def test_rtn_relaxation_gradient_matches_finite_differences():
    from exact_models import tiny_llama
    from torch.func import functional_call

    m = tiny_llama()
    targets = find_targets(m)[:3]
    rng = np.random.default_rng(1)
    init = {t.name: rng.uniform(2.2, 7.8, t.out_features) for t in targets}  # inside segments, not at their ends
    nw = _rtn_widths(m, targets, [0, 2, 3, 4, 6, 8], init)
    torch.manual_seed(0)
    x = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        ref = F.log_softmax(m(input_ids=x).logits, -1)
    for p in m.parameters():
        p.requires_grad_(False)

    def loss():
        subs = {f"{t.name}.weight": nw.relaxed_weight(t.name) for t in targets}
        lp = F.log_softmax(functional_call(m, subs, args=(), kwargs={"input_ids": x}).logits, -1)
        return (ref.exp() * (ref - lp)).sum(-1).mean()

    loss().backward()
    key = nw._key(targets[2].name)
    for param, idx in [(nw.logits[key], 1), (nw.logits[nw._key(targets[0].name)], 4), (nw.gates[key], 2)]:
        _assert_gradient_is_central_difference(loss, param, idx)


def test_diffq_rtn_search_end_to_end(llama_dir, text_file):
    plan = api.search(
        llama_dir, text_file, SearchConfig(budget="4.5", method="diffq", steps=3, kl_samples=2, relax="rtn", **SMALL)
    )
    assert plan.summary["avg_bits"] <= 4.5 and plan.provenance["relax"] == "rtn"
    assert np.isfinite(plan.provenance["final_kl"])
    with pytest.raises(BitsearchError, match="relax 'sharp' is not one of"):
        api.search(llama_dir, text_file, SearchConfig(budget="4.5", method="diffq", relax="sharp", **SMALL))


def test_rtn_relaxation_shares_the_held_out_judges_rounded_weights():
    from exact_models import tiny_llama

    from bitsearch.search.kl import PlanKL

    m = tiny_llama()
    targets = find_targets(m)[:2]
    menu = [0, 2, 3, 4, 8]
    init = {t.name: np.full(t.out_features, 3.4) for t in targets}
    judge = PlanKL(m, targets, torch.randint(0, 32, (2, 12)), menu, 4)
    shared = NoisyWidths(m, targets, 4, menu, init, stacks=judge.stack)
    own = NoisyWidths(m, targets, 4, menu, init)
    for t in targets:
        assert shared.stacks[t.name].data_ptr() == judge.stack[t.name][1].data_ptr()  # a view, no copy
        assert torch.equal(shared.interpolated_weight(t.name), own.interpolated_weight(t.name))
    with pytest.raises(ValueError, match="sorted"):
        NoisyWidths(m, targets, 4, [2, 0, 3, 4, 8], init, stacks=judge.stack)
