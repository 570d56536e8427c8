"""SignRound under a mixed-width plan: zero steps are round-to-nearest bit for bit, a few steps
beat it (block MSE and KL on held-out tokens), parameters stay in their bounds, and the model's
weights pack with the returned scales/zeros to the same values and the plan's bytes.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_finalize_signround.py
"""

import pytest
import torch
from plans import MIXED_WIDTHS, mixed_plan

from bitsearch.blocks import BlockRunner
from bitsearch.couplings import find_couplings
from bitsearch.errors import BitsearchError
from bitsearch.finalize.signround import SignRoundSettings, minmax_qparams, signround
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets
from bitsearch.packed import pack_weight, unpack_weight
from bitsearch.quantize import fake_quantize_model

GS = 32
WIDTHS = MIXED_WIDTHS
STEPS = 30


def tokens(model, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, 32), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def kl_to(ref, model, x) -> float:
    lp, lq = ref(input_ids=x).logits.log_softmax(-1), model(input_ids=x).logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


@torch.no_grad()
def block_mse(ref, model, x) -> list[float]:
    """Per block, the MSE between the float and the quantized model's block outputs."""
    rf, rq = BlockRunner(ref), BlockRunner(model)
    (hf, kf), (hq, kq) = rf.capture(x), rq.capture(x)
    out = []
    for i in range(rf.n_blocks):
        hf, hq = rf.run_block(rf.blocks[i], hf, kf), rq.run_block(rq.blocks[i], hq, kq)
        out.append((hf - hq).pow(2).mean().item())
    return out


@pytest.mark.parametrize(
    "arch,targets_re",
    [
        ("llama", r"embed_tokens|layers\."),  # tied embedding
        ("qwen2", r"embed_tokens|lm_head|layers\."),
    ],
)  # untied head
def test_zero_steps_is_round_to_nearest(tiny_models, arch, targets_re):
    path = tiny_models[arch]
    orig = load_model(path)
    plan = mixed_plan(orig, targets_re)
    assert any(t.kind == "embedding" for t in find_targets(orig, targets=targets_re))
    model = load_model(path)
    res = signround(model, plan, tokens(model, 12, 1), SignRoundSettings(steps=0, batch_size=8), show_progress=False)
    rtn = fake_quantize_model(load_model(path), plan)
    for (k, a), (k2, b) in zip(model.state_dict().items(), rtn.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert set(res) == set(plan.bits)
    for name, (scales, zeros) in res.items():
        s, z = minmax_qparams(orig.get_submodule(name).weight, plan.bits[name], GS)
        assert torch.equal(scales, s) and torch.equal(zeros, z), name
    assert [b["block"] for b in res.block_losses] == [0, 1]
    assert all(b["final"] == b["rtn"] and b["best_step"] == -1 for b in res.block_losses)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.fixture(scope="module", params=["llama", "opt"])
def tuned(request, tiny_models):
    path = tiny_models[request.param]
    ref = load_model(path)
    plan = mixed_plan(ref)
    model = load_model(path)
    flags = [p.requires_grad for p in model.parameters()]
    res = signround(
        model, plan, tokens(model, 32, 1), SignRoundSettings(steps=STEPS), show_progress=False, return_state=True
    )
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    return dict(path=path, ref=ref, plan=plan, model=model, res=res)


def test_signround_beats_round_to_nearest(tuned):
    ref, plan, model, res = tuned["ref"], tuned["plan"], tuned["model"], tuned["res"]
    rtn = fake_quantize_model(load_model(tuned["path"]), plan)
    held = tokens(ref, 16, 7)  # not the calibration tokens
    mse_rtn, mse_sr = block_mse(ref, rtn, held), block_mse(ref, model, held)
    kl_rtn, kl_sr = kl_to(ref, rtn, held), kl_to(ref, model, held)
    print(f"held-out block MSE RTN {mse_rtn} SignRound {mse_sr}; KL RTN {kl_rtn:.4f} SignRound {kl_sr:.4f}")
    assert all(s < 0.9 * r for s, r in zip(mse_sr, mse_rtn))
    assert kl_sr < 0.9 * kl_rtn
    for b in res.block_losses:  # whole calibration batch, quantized inputs
        assert b["targets"] > 0 and b["final"] < 0.8 * b["rtn"] and b["best_step"] >= 0


def test_parameters_in_bounds_and_fixed_rows(tuned):
    ref, plan, model, res = tuned["ref"], tuned["plan"], tuned["model"], tuned["res"]
    assert set(res.state) == set(plan.bits)
    moved_v = moved_f = 0
    for name, bits in plan.bits.items():
        st, b = res.state[name], torch.as_tensor(bits)
        v, lo, hi = st["offsets"], st["min_factor"], st["max_factor"]
        assert v.abs().max() <= (STEPS + 1) / 2 / STEPS + 1e-6  # at most sum_t lr_t from 0 (unclamped)
        for f in (lo, hi):
            assert f.min() >= 0.5 and f.max() <= 1.0
        quant = (b >= 2) & (b <= 8)
        assert (v[~quant] == 0).all() and (lo[~quant] == 1).all() and (hi[~quant] == 1).all()
        moved_v += int((v[quant] != 0).sum())
        moved_f += int((lo[quant] < 1).sum() + (hi[quant] < 1).sum())
        w, w0 = model.get_submodule(name).weight, ref.get_submodule(name).weight
        assert (w[b == 0] == 0).all()
        assert torch.equal(w[b == 16], w0[b == 16].half().float())
        scales, zeros = res[name]
        assert (scales[~quant] == 1).all() and (zeros[~quant] == 0).all()
    assert moved_v > 0 and moved_f > 0  # both kinds of parameters were trained


def test_packing_reproduces_weights_and_plan_bytes(tuned):
    plan, model, res = tuned["plan"], tuned["model"], tuned["res"]
    total = 0
    for name, bits in plan.bits.items():
        w = model.get_submodule(name).weight.detach()
        scales, zeros = res[name]
        assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8
        tensors = pack_weight(w, torch.as_tensor(bits), GS, scales=scales, zeros=zeros)
        assert torch.equal(unpack_weight(tensors, w.shape[1], GS), w), name
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        # min-max packing of the trained weights would store another grid
    assert total == plan.n_bytes()


def test_offload_float_inputs_and_determinism(tiny_models):
    path = tiny_models["llama"]
    plan = mixed_plan(load_model(path))
    x = tokens(load_model(path), 12, 3)
    settings = SignRoundSettings(steps=5, batch_size=4, seed=2)
    runs = []
    for offload in (False, True):
        m = load_model(path)
        runs.append((m, signround(m, plan, x, settings, show_progress=False, offload=offload)))
    (a, ra), (b, rb) = runs
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
    assert ra.block_losses == rb.block_losses
    m = load_model(path)
    rf = signround(m, plan, x, SignRoundSettings(steps=5, batch_size=4, seed=2, float_inputs=True), show_progress=False)
    assert rf.block_losses[0] == ra.block_losses[0]  # block 0 sees the same inputs either way
    assert rf.block_losses[1]["rtn"] != ra.block_losses[1]["rtn"]
    assert all(r["final"] <= r["rtn"] for r in rf.block_losses)


def test_refusals(tiny_models):
    model = load_model(tiny_models["llama"])
    plan = mixed_plan(model)
    plan.couplings = find_couplings(model, list(plan.bits))
    assert plan.couplings
    with pytest.raises(BitsearchError, match="coupled pruning"):
        signround(model, plan, tokens(model, 4, 0), show_progress=False)
    plan.couplings = []
    with pytest.raises(BitsearchError, match="token ids"):
        signround(model, plan, torch.zeros(5, dtype=torch.long), show_progress=False)
    for bad in (dict(steps=-1), dict(batch_size=0), dict(lr=0.0)):
        with pytest.raises(BitsearchError):
            SignRoundSettings(**bad)
    assert SignRoundSettings().learning_rate == 1 / 200 and SignRoundSettings(steps=50).learning_rate == 0.02
