"""One-pass loss responses (grad_response.py) against brute force: per-sample weight gradients
from one ``torch.autograd.grad`` per sample, finite differences of the loss, and the exact
per-layer measurement of the layer-loss calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exact_models import per_sample_grads, tiny_llama
from test_fisher import conftest_llama

from bitsearch.models import Target, find_targets
from bitsearch.quant.grid import fake_quantize
from bitsearch.sensitivity.grad_response import Probe, gradient_responses, predicted_increase, probe_sums


@pytest.fixture(scope="module")
def tiny():
    m = tiny_llama()
    targets = [Target("model.embed_tokens", 32, 8)] + find_targets(m)
    batch = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(1))
    return m, targets, batch


def test_per_sample_changes_match_brute_force(tiny):
    """u_s = <per-sample gradient, D> for dense and row probes, Linear and Embedding targets,
    whatever the micro-batching."""
    m, targets, batch = tiny
    g = torch.Generator().manual_seed(3)
    probes, dense = {}, {}
    for t in targets:
        w = m.get_submodule(t.name).weight.detach()
        d = torch.randn(w.shape, generator=g, dtype=w.dtype)
        rows = torch.tensor([0, w.shape[0] - 1])
        masked = torch.zeros_like(w)
        masked[rows] = d[rows]
        probes[t.name] = [Probe(d), Probe(d[rows], rows)]
        dense[t.name] = [d, masked]
    grads = per_sample_grads(m, targets, batch)
    for mb in (2, 5):
        u = probe_sums(m, targets, batch, probes, micro_batch=mb, show_progress=False)
        for t in targets:
            want = np.stack([(grads[t.name] * d).sum((1, 2)).numpy() for d in dense[t.name]])
            np.testing.assert_allclose(u[t.name], want, rtol=1e-9, atol=1e-12)


def test_tied_embedding_adds_both_uses():
    m = conftest_llama(tie=True)
    targets = [Target("model.embed_tokens", 64, 64)]
    batch = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    w = m.model.embed_tokens.weight.detach()
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    u = probe_sums(m, targets, batch, {targets[0].name: [Probe(d)]}, micro_batch=2, show_progress=False)
    want = (per_sample_grads(m, targets, batch)[targets[0].name] * d.double()).sum((1, 2)).numpy()
    np.testing.assert_allclose(u[targets[0].name][0], want, rtol=1e-4, atol=1e-6)


def mean_nll(m, batch) -> float:
    with torch.no_grad():
        logits = m(input_ids=batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


def test_first_order_term_matches_central_differences(tiny):
    """sum_s u_s / (N T) is the directional derivative of the mean loss: it matches the central
    difference (L(W + D) - L(W - D)) / 2 of the float64 model's loss."""
    m, targets, batch = tiny
    g = torch.Generator().manual_seed(5)
    deltas = {
        t.name: 1e-5 * torch.randn(m.get_submodule(t.name).weight.shape, generator=g, dtype=torch.float64)
        for t in targets
    }
    u = probe_sums(m, targets, batch, {n: [Probe(d)] for n, d in deltas.items()}, micro_batch=2, show_progress=False)
    for t in targets:
        w = m.get_submodule(t.name).weight
        saved = w.data.clone()
        w.data += deltas[t.name]
        plus = mean_nll(m, batch)
        w.data.copy_(saved - deltas[t.name])
        minus = mean_nll(m, batch)
        w.data.copy_(saved)
        lin = u[t.name].sum() / (batch.shape[0] * (batch.shape[1] - 1))
        assert lin == pytest.approx((plus - minus) / 2, rel=1e-6), t.name


def test_second_order_term_by_hand():
    u = np.array([[1.0, -2.0, 3.0]])
    assert predicted_increase(u, 4)[0] == pytest.approx((2.0 + 0.5 * 14.0) / 12)
    assert predicted_increase(u, 4, first_order=False)[0] == pytest.approx(0.5 * 14.0 / 12)


def test_gradient_responses_are_those_of_their_probes(tiny):
    """The reference-width and pruning responses are the predictions of the quantization
    residual and of zeroing the given rows."""
    m, targets, batch = tiny
    rows = {t.name: np.array([1, 3]) for t in targets}
    resp, prune = gradient_responses(m, targets, batch, 2, 4, {"imatrix": rows}, micro_batch=3, show_progress=False)
    grads = per_sample_grads(m, targets, batch)
    for t in targets:
        w = m.get_submodule(t.name).weight.detach()
        d_q = fake_quantize(w.float(), 2, 4).double() - w.double()
        d_p = torch.zeros_like(w)
        d_p[rows[t.name]] = -w[rows[t.name]]
        for d, got in ((d_q, resp[t.name]), (d_p, prune["imatrix"][t.name])):
            us = (grads[t.name] * d).sum((1, 2)).numpy()
            assert got == pytest.approx(predicted_increase(us[None], batch.shape[1] - 1)[0], rel=1e-5)


def test_sampled_labels_are_reproducible_and_differ_from_data(tiny):
    m, targets, batch = tiny
    probes = {t.name: [Probe(torch.ones_like(m.get_submodule(t.name).weight.detach()))] for t in targets[1:3]}
    a = probe_sums(m, targets, batch, probes, labels="sampled", seed=1, show_progress=False)
    b = probe_sums(m, targets, batch, probes, labels="sampled", seed=1, show_progress=False)
    c = probe_sums(m, targets, batch, probes, show_progress=False)
    for name in probes:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.allclose(a[name], c[name])


def test_model_state_restored(tiny):
    m, targets, batch = tiny
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    gradient_responses(m, targets, batch, 2, 4, micro_batch=2, show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert [p.requires_grad for p in m.parameters()] == flags
    assert not any(mod._forward_hooks for mod in m.modules())
