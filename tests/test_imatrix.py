"""Input estimators (imatrix, snr) against direct computations from captured inputs, the
block-by-block runner against the whole model, and the per-layer loss calibration."""

import numpy as np
import pytest
import torch
from conftest import ARCHS

from bitsearch.blocks import BlockRunner
from bitsearch.config import SensitivityConfig
from bitsearch.evaluate import batch_nll
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets
from bitsearch.quant import fake_quantize
from bitsearch.sensitivity import layer_loss_response
from bitsearch.sensitivity.base import SensitivityContext
from bitsearch.sensitivity.imatrix import ImatrixEstimator, weighted_error_curves
from bitsearch.sensitivity.pipeline import collect_input_curves
from bitsearch.sensitivity.snr import SnrEstimator, db_slope, snr_db

BITS = [0, 2, 3, 4, 8]


def _captured_inputs(m, names, batch):
    seen = {n: [] for n in names}
    hs = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: seen[n].append(a[0])) for n in names]
    with torch.no_grad():
        m(input_ids=batch)
    for h in hs:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double() for n, v in seen.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_input_curves_match_captured_inputs(arch, tiny_models):
    """imatrix and snr curves from the block-by-block pass equal the formulas evaluated on the
    inputs a whole-model forward feeds each target (every architecture, shared q/k/v inputs)."""
    m = load_model(tiny_models[arch])
    targets = find_targets(m)
    torch.manual_seed(0)
    batch = torch.randint(0, 300, (5, 20))
    ctx = SensitivityContext(
        model=m, targets=targets, batch=batch, bits=BITS, group_size=16, micro_batch=2, show_progress=False
    )
    curves = collect_input_curves(ctx, [ImatrixEstimator(), SnrEstimator()])
    xs = _captured_inputs(m, [t.name for t in targets], batch)
    for t in targets:
        x = xs[t.name]
        w = m.get_submodule(t.name).weight.detach()
        im = curves["imatrix"][t.name]
        np.testing.assert_allclose(im.errors, weighted_error_curves(w, x.pow(2).mean(0), BITS, 16), rtol=1e-6)
        sn = curves["snr"][t.name]
        signal = (x @ w.double().T).pow(2).mean(0).numpy()
        np.testing.assert_allclose(sn.metrics["signal"], signal, rtol=1e-6)
        for k, b in enumerate(BITS):
            d = (w - fake_quantize(w, b, 16)).double()
            # statistics accumulate float32 products: allow their rounding relative to the layer's scale
            direct = (x @ d.T).pow(2).mean(0).numpy()
            np.testing.assert_allclose(sn.errors[:, k], direct, rtol=1e-5, atol=1e-6 * direct.max())
        np.testing.assert_allclose(sn.errors[:, 0], signal, rtol=1e-6)  # pruned: the noise is the signal


def test_weighted_error_curves_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    cw = torch.rand(8)
    e = weighted_error_curves(w, cw, [0, 2, 4], group_size=4)
    assert e[:, 0] == pytest.approx((w.double().pow(2) * cw.double()).sum(1).numpy())
    d = w - fake_quantize(w, 2, 4)
    assert e[:, 1] == pytest.approx((d.double().pow(2) * cw.double()).sum(1).numpy())
    assert (e[:, 2] < e[:, 1]).all()


def test_snr_gains_about_6db_per_bit():
    """Uniform quantization of a Gaussian row: the noise power falls 4x per bit (6.02 dB)."""
    torch.manual_seed(0)
    w = torch.randn(64, 1024)
    bits = [3, 4, 5, 6, 7, 8]
    est = SnrEstimator()
    from bitsearch.models import Target

    lc = est.layer_curves(Target("x", 64, 1024), w, torch.eye(1024, dtype=torch.float64), bits, 128)
    slope = lc.metrics["slope_db"]
    assert np.abs(slope - 6.02).max() < 0.3
    db = np.stack([lc.metrics[f"db{b}"] for b in bits], 1)
    assert (np.diff(db, axis=1) > 4).all()
    assert db_slope([2, 3], np.array([[1.0, 7.0]]))[0] == pytest.approx(6.0)
    assert snr_db(np.array([1.0]), np.array([0.0]))[0] > 100  # noiseless: capped, finite


@pytest.mark.parametrize("arch", ARCHS)
def test_block_runner_reproduces_the_model(arch, tiny_models):
    m = load_model(tiny_models[arch])
    batch = torch.randint(0, 300, (3, 24))
    runner = BlockRunner(m)
    h, kw = runner.capture(batch)
    nll = runner.nll_from(0, [h], [kw], [batch]) / (3 * 23)
    assert nll == pytest.approx(batch_nll(m, batch), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_layer_response_equals_whole_model_response(arch, tiny_models):
    """The cached-block response equals quantizing the layer and running the whole model; the
    model comes back unchanged."""
    m = load_model(tiny_models[arch])
    targets = find_targets(m)
    batch = torch.randint(0, 300, (4, 16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    base = batch_nll(m, batch)
    resp = layer_loss_response(m, targets, batch, 2, 16, micro_batch=3, show_progress=False)
    assert set(resp) == {t.name for t in targets}
    for t in targets[::3] + [targets[-1]]:
        w = m.get_submodule(t.name).weight
        saved = w.data.clone()
        w.data.copy_(fake_quantize(saved, 2, 16))
        direct = batch_nll(m, batch) - base
        w.data.copy_(saved)
        assert resp[t.name] == pytest.approx(direct, rel=1e-4, abs=1e-6)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_offload_gives_the_same_table(llama_dir, text_file):
    """--offload (blocks kept on the CPU, moved one at a time to the device) changes nothing but
    where blocks live; on a CPU-only machine it exercises the same code path."""
    from bitsearch import api

    kw = dict(
        samples=4,
        seq_len=32,
        group_size=16,
        loss_calibration_samples=2,
        estimators="imatrix,snr",
        bits="0,2,4",
        loss_calibration="layer-loss",
        show_progress=False,
    )
    a = api.sensitivity(llama_dir, text_file, SensitivityConfig(**kw))
    b = api.sensitivity(llama_dir, text_file, SensitivityConfig(offload=True, **kw))
    assert b.meta["offload"] is True
    np.testing.assert_allclose(b.curves(mix="snr"), a.curves(mix="snr"), rtol=1e-6)
    np.testing.assert_allclose(b.curves(mix="imatrix"), a.curves(mix="imatrix"), rtol=1e-6)
