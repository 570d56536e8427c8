"""Diagonal empirical Fisher from hooked per-sample gradients against a brute-force loop of one
``torch.autograd.grad`` per calibration sample, on Linear and Embedding targets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_config
from exact_models import ReceivingRank, SendingRank, per_sample_grads, tiny_llama

from bitsearch.models import Target, find_targets
from bitsearch.quant.grid import fake_quantize
from bitsearch.sensitivity import fisher as fisher_mod
from bitsearch.sensitivity.base import ESTIMATORS, SensitivityContext
from bitsearch.sensitivity.fisher import FisherEstimator, collect_fisher

BITS = [0, 2, 4, 8]


def conftest_llama(tie: bool = True):
    """The conftest family's tiny Llama (2 layers, hidden 64, float32, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab=64)
    cfg.tie_word_embeddings = tie
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m


def brute_force_fisher(m, targets, batch):
    """(1/N) sum_s (dL_s/dW)^2 with one autograd.grad per sample s (L_s: its mean next-token CE)."""
    grads = per_sample_grads(m, targets, batch)
    return {t.name: (grads[t.name] / (batch.shape[1] - 1)).pow(2).mean(0) for t in targets}


def _ctx(m, targets, batch, **kw):
    args = dict(model=m, targets=targets, batch=batch, bits=BITS, group_size=4, micro_batch=2, show_progress=False)
    args.update(kw)
    return SensitivityContext(**args)


def _state(m):
    return (
        {k: v.clone() for k, v in m.state_dict().items()},
        [p.requires_grad for p in m.parameters()],
        [mod.training for mod in m.modules()],
    )


def _assert_unchanged(m, state):
    sd, flags, modes = state
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert [p.requires_grad for p in m.parameters()] == flags
    assert [mod.training for mod in m.modules()] == modes
    assert all(p.grad is None for p in m.parameters())
    assert not any("forward" in vars(mod) for mod in m.modules())
    assert not any(mod._forward_hooks for mod in m.modules())


@pytest.fixture(scope="module")
def tiny():
    m = tiny_llama()
    targets = [Target("model.embed_tokens", 32, 8)] + find_targets(m)
    batch = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(1))
    # repeated tokens inside a sample: their embedding gradients must add before squaring
    assert any(len(set(r.tolist())) < r.numel() for r in batch)
    return m, targets, batch


def test_registered():
    assert ESTIMATORS["fisher"] is FisherEstimator
    assert FisherEstimator.loss_units


def test_matches_brute_force_float64_with_embedding(tiny):
    m, targets, batch = tiny
    state = _state(m)
    got = collect_fisher(_ctx(m, targets, batch))  # micro-batches of 2, 2, 1
    _assert_unchanged(m, state)
    want = brute_force_fisher(m, targets, batch)
    for t in targets:
        assert got[t.name].shape == (t.out_features, t.in_features) and got[t.name].dtype == torch.float64
        torch.testing.assert_close(got[t.name], want[t.name], rtol=1e-9, atol=1e-15)
        assert want[t.name].abs().max() > 0
    # embedding rows of tokens absent from the batch (or only last in a row) have no gradient
    present = set(batch[:, :-1].reshape(-1).tolist())
    for v in range(32):
        assert (got["model.embed_tokens"][v].abs().max() > 0) == (v in present)


def test_curves_by_hand(tiny):
    m, targets, batch = tiny
    res = FisherEstimator().estimate(_ctx(m, targets, batch))
    want = brute_force_fisher(m, targets, batch)
    assert set(res) == {t.name for t in targets}
    for t in targets:
        c = res[t.name]
        assert set(c.metrics) == {"fisher_sum"}
        f = want[t.name]
        np.testing.assert_allclose(c.metrics["fisher_sum"], f.sum(1).numpy(), rtol=1e-9)
        assert c.errors.shape == (t.out_features, len(BITS)) and c.errors.dtype == np.float64
        assert np.isfinite(c.errors).all() and (c.errors >= 0).all()
        w = m.get_submodule(t.name).weight.detach()
        for k, b in enumerate(BITS):
            by_hand = 0.5 * (batch.shape[1] - 1) * (f * (w - fake_quantize(w, b, 4)).pow(2)).sum(1).numpy()
            np.testing.assert_allclose(c.errors[:, k], by_hand, rtol=1e-9, atol=1e-18)
        # pruning a row costs more than 8-bit storage of it
        assert (c.errors[:, 0] >= c.errors[:, -1]).all()


def test_matches_brute_force_float32_conftest_llama():
    m = conftest_llama(tie=False)
    targets = [Target("model.embed_tokens", 64, 64)] + find_targets(m)
    batch = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    state = _state(m)
    got = collect_fisher(_ctx(m, targets, batch, micro_batch=3))
    _assert_unchanged(m, state)
    want = brute_force_fisher(m, targets, batch)
    for t in targets:
        torch.testing.assert_close(got[t.name], want[t.name], rtol=1e-4, atol=1e-6 * float(want[t.name].max()))


def test_micro_batching_chunking_and_checkpointing_do_not_change_it(tiny, monkeypatch):
    m, targets, batch = tiny
    base = collect_fisher(_ctx(m, targets, batch, micro_batch=5))
    one = collect_fisher(_ctx(m, targets, batch, micro_batch=1))
    monkeypatch.setattr(fisher_mod, "_CHUNK_ELEMENTS", 1)  # per-sample einsum one sample at a time
    chunked = collect_fisher(_ctx(m, targets, batch, micro_batch=3))
    monkeypatch.undo()
    state = _state(m)
    calls = []
    h = m.get_submodule(targets[1].name).register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = collect_fisher(_ctx(m, targets, batch, micro_batch=5, checkpointing=True))
    h.remove()
    assert len(calls) == 2  # forward + recomputation in the backward: the block was checkpointed
    _assert_unchanged(m, state)
    for other in (one, chunked, ckpt):
        for name in base:
            torch.testing.assert_close(other[name], base[name], rtol=1e-10, atol=1e-16)


def test_two_ranks_sum_to_one_process(tiny):
    m, targets, batch = tiny

    one = FisherEstimator().estimate(_ctx(m, targets, batch, micro_batch=1))
    r0 = SendingRank(rank=0, world=2)
    part0 = FisherEstimator().estimate(_ctx(m, targets, batch, micro_batch=1, dist=r0))
    r1 = ReceivingRank(rank=1, world=2, received=r0.sent)
    two = FisherEstimator().estimate(_ctx(m, targets, batch, micro_batch=1, dist=r1))
    assert not r1.received
    for name, c in one.items():
        assert not np.allclose(part0[name].metrics["fisher_sum"], c.metrics["fisher_sum"])
        np.testing.assert_allclose(two[name].metrics["fisher_sum"], c.metrics["fisher_sum"], rtol=1e-12)
        np.testing.assert_allclose(two[name].errors, c.errors, rtol=1e-12, atol=1e-20)


def test_tied_embedding_and_lm_head(monkeypatch):
    """A tied embedding's weight is also the lm_head's: its Fisher is that of the shared weight
    (per-sample gradients of both uses added before squaring), whatever the chunking."""
    m = conftest_llama(tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    targets = [Target("model.embed_tokens", 64, 64)] + find_targets(m)[:2]
    batch = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    state = _state(m)
    got = collect_fisher(_ctx(m, targets, batch))
    _assert_unchanged(m, state)
    monkeypatch.setattr(fisher_mod, "_CHUNK_ELEMENTS", 1)
    chunked = collect_fisher(_ctx(m, targets, batch, micro_batch=3))
    want = brute_force_fisher(m, targets, batch)
    for t in targets:
        torch.testing.assert_close(got[t.name], want[t.name], rtol=1e-4, atol=1e-6 * float(want[t.name].max()))
        torch.testing.assert_close(chunked[t.name], got[t.name], rtol=1e-5, atol=1e-9 * float(want[t.name].max()))


def test_flags_and_mode_restored():
    m = conftest_llama(tie=False)
    batch = torch.randint(0, 64, (2, 8))
    m.train()
    for i, p in enumerate(m.parameters()):
        p.requires_grad_(i % 3 == 0)
    state = _state(m)
    res = FisherEstimator().estimate(_ctx(m, find_targets(m)[:3], batch))
    _assert_unchanged(m, state)
    assert all(np.isfinite(c.errors).all() and np.isfinite(c.metrics["fisher_sum"]).all() for c in res.values())
