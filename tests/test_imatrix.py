"""imatrix against a direct computation, and the per-layer loss calibration."""

import numpy as np
import pytest
import torch

from bitsearch.evaluate import batch_nll
from bitsearch.models import find_targets, load_model
from bitsearch.quant import fake_quantize
from bitsearch.sensitivity import layer_loss_response
from bitsearch.sensitivity.imatrix import collect_imatrix, weighted_error_curves


def test_imatrix_matches_captured_inputs(llama_dir):
    m = load_model(llama_dir)
    targets = find_targets(m)
    batch = torch.randint(0, 300, (3, 20))
    seen = {}
    name = targets[3].name
    h = m.get_submodule(name).register_forward_hook(lambda mod, a, o: seen.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        m(input_ids=batch)
    h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]]).double()
    imat = collect_imatrix(m, targets, batch, micro_batch=2, show_progress=False)
    assert torch.allclose(imat[name], x.pow(2).mean(0), rtol=1e-6)


def test_weighted_error_curves_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    cw = torch.rand(8)
    e = weighted_error_curves(w, cw, [0, 2, 4], group_size=4)
    assert e[:, 0] == pytest.approx((w.double().pow(2) * cw.double()).sum(1).numpy())
    d = w - fake_quantize(w, 2, 4)
    assert e[:, 1] == pytest.approx((d.double().pow(2) * cw.double()).sum(1).numpy())
    assert (e[:, 2] < e[:, 1]).all()


def test_layer_response_restores_weights(llama_dir):
    m = load_model(llama_dir)
    targets = find_targets(m)[:3]
    batch = torch.randint(0, 300, (2, 16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    base = batch_nll(m, batch)
    resp = layer_loss_response(m, targets, batch, 2, 16, show_progress=False)
    assert set(resp) == {t.name for t in targets}
    assert all(np.isfinite(v) for v in resp.values())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert batch_nll(m, batch) == base
