"""QAT fake quantization: equal to the grid at init, mixed widths in one layer, pruned rows, and
conversion to packed layers with the plan's exact bytes and the trained model's outputs."""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from bitsearch.errors import BitsearchError
from bitsearch.finalize import QuantLinear, convert, fake_quant_rows, prepare
from bitsearch.io.checkpoint import load_packed, save_packed
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.packed import PackedEmbedding, PackedLinear, PackedTiedHead, pack_weight
from bitsearch.quant.grid import QUANT_WIDTHS, choose_qparams, fake_quantize, n_groups
from bitsearch.quant.packing import unpack_codes
from bitsearch.quantize import fake_quantize_model

SURROGATES = [dict(), dict(round_mode="sigmoid", temperature=20.0, clamp_mode="soft", beta=2.0)]


def mixed_rows(rows: int, k: int, widths, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.05
    w[1] = 0.0  # a group with scale 0 (divided by 1, as the grid does)
    w[2, 3] = 1.5  # an outlier
    bits = torch.tensor(widths, dtype=torch.uint8)[torch.randint(len(widths), (rows,), generator=g)]
    return w, bits


def grid_rows(w: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each row fake-quantized by the grid at its own width (as ``fake_quantize_model``)."""
    out = torch.empty_like(w)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        out[rows] = fake_quantize(w[rows], b, group_size)
    return out


@pytest.mark.parametrize("group_size", [-1, 7, 16, 40, 64])
@pytest.mark.parametrize("opts", SURROGATES)
def test_fake_quant_rows_equals_grid_bit_for_bit(group_size, opts):
    w, bits = mixed_rows(24, 40, QUANT_WIDTHS)
    ng = n_groups(40, group_size)
    scale, zero = torch.empty(24, ng, dtype=torch.float16), torch.empty(24, ng, dtype=torch.uint8)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        scale[rows], zero[rows] = choose_qparams(w[rows], b, group_size)
    qmax = 2.0 ** bits.float() - 1
    got = fake_quant_rows(w, scale.float(), zero.float(), qmax, group_size, **opts)
    assert torch.equal(got, grid_rows(w, bits, group_size))
    # zero offsets change nothing; offsets move codes and receive a gradient
    assert torch.equal(
        fake_quant_rows(w, scale.float(), zero.float(), qmax, group_size, offsets=torch.zeros_like(w), **opts), got
    )
    offsets = torch.full_like(w, 0.3, requires_grad=True)
    moved = fake_quant_rows(w, scale.float(), zero.float(), qmax, group_size, offsets=offsets, **opts)
    assert not torch.equal(moved, got)
    moved.pow(2).sum().backward()
    assert offsets.grad.abs().sum() > 0


def test_fake_quant_rows_checks_shapes():
    with pytest.raises(ValueError, match=r"are not \(4, 3\)"):
        fake_quant_rows(torch.zeros(4, 40), torch.ones(4, 2), torch.zeros(4, 2), 15, 16)


def make_linear(widths, bias: bool, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    w, bits = mixed_rows(32, 40, widths, seed)
    bits[:4] = torch.tensor([0, 16, 3, 0], dtype=torch.uint8)
    lin = nn.Linear(40, 32, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.normal_()
    return lin, bits


@pytest.mark.parametrize("opts", SURROGATES)
def test_quant_linear_mixed_widths_at_init_and_pruned_rows(opts):
    lin, bits = make_linear((0, 2, 3, 4, 5, 6, 7, 8, 16), bias=True)
    ql = QuantLinear(lin, bits, 16, **opts)
    x = torch.randn(5, 40)
    y = ql(x)
    expect = nn.functional.linear(x, grid_rows(lin.weight.detach(), bits, 16), lin.bias)
    torch.testing.assert_close(y, expect, rtol=0, atol=1e-6)
    pruned, keep = bits == 0, bits == 16
    quant = ~pruned & ~keep
    assert torch.equal(y[:, pruned], lin.bias.detach()[pruned].expand(5, -1))  # 0 plus the bias, exactly
    (y * torch.randn_like(y)).sum().backward()
    assert (ql.weight.grad[pruned] == 0).all() and ql.weight.grad[keep].abs().sum() > 0
    assert ql.weight.grad[quant].abs().sum() > 0
    assert (ql.scale.grad[~quant] == 0).all() and (ql.zero.grad[~quant] == 0).all()
    assert ql.scale.grad[quant].abs().sum() > 0
    assert ql.bias.grad is None and not ql.bias.requires_grad
    scales, zeros = ql.qparams()
    assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8 and scales.shape == (32, 3)
    assert (scales[~quant] == 1).all() and (zeros[~quant] == 0).all()


def test_quant_linear_learn_flags_and_bad_widths():
    lin, bits = make_linear((2, 4), bias=False)
    ql = QuantLinear(lin, bits, -1, learn_weight=False, learn_zero=False)
    assert [p.requires_grad for p in (ql.weight, ql.scale, ql.zero)] == [False, True, False]
    assert ql(torch.randn(2, 40))[:, bits == 0].eq(0).all()
    with pytest.raises(ValueError, match="width 1"):
        QuantLinear(lin, torch.ones(32), 16)
    with pytest.raises(ValueError, match="31 widths for 32 rows"):
        QuantLinear(lin, bits[:31], 16)


def test_quant_linear_forward_matches_its_packed_form_after_changes():
    """Weights, scales and zeros moved off the grid (zeros beyond [0, q_max], a tiny scale):
    the packed layer built from qparams() reproduces the forward exactly."""
    lin, bits = make_linear((0, 2, 3, 4, 8, 16), bias=True, seed=1)
    ql = QuantLinear(lin, bits, 16, round_mode="sigmoid", temperature=5.0, clamp_mode="soft")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ql.weight.add_(torch.randn(ql.weight.shape, generator=g) * 0.01)
        ql.scale.mul_(1 + 0.3 * torch.rand(ql.scale.shape, generator=g))
        ql.zero.add_(torch.randint(-3, 4, ql.zero.shape, generator=g).float() + 0.3)
        ql.zero[5, 0] = 300.0
        ql.scale[6, 1] = -0.1
    x = torch.randn(7, 40)
    packed = ql.to_packed()
    assert isinstance(packed, PackedLinear)
    assert torch.equal(packed.dequantized_weight(), ql.dequantized_weight())
    torch.testing.assert_close(packed(x), ql(x), rtol=0, atol=1e-6)


def tiny_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=64))  # tied embeddings
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m.eval()


def make_plan(model: nn.Module, group_size: int = 24) -> BitPlan:
    targets = find_targets(model, targets=r"embed_tokens|layers\.0\.")
    rng = np.random.default_rng(0)
    menu = [0, 2, 3, 4, 5, 8, 16]
    bits = {
        t.name: rng.choice(menu, size=t.out_features, p=[0.05, 0.2, 0.25, 0.2, 0.1, 0.1, 0.1]).astype(np.uint8)
        for t in targets
    }
    plan = BitPlan(model=model_fingerprint(model, targets), group_size=group_size, menu=menu, bits=bits)
    plan.fill_summary()
    return plan


def test_prepare_train_convert_tiny_llama(tmp_path):
    model = tiny_llama()
    plan = make_plan(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fake_quantize_model(copy.deepcopy(model), plan)(input_ids=ids).logits

    qls = prepare(model, plan, round_mode="sigmoid", temperature=5.0, clamp_mode="soft")
    assert set(qls) == {n for n in plan.bits if n != "model.embed_tokens"}
    assert isinstance(model.model.embed_tokens, PackedEmbedding) and isinstance(model.lm_head, PackedTiedHead)
    assert all(model.get_submodule(n) is q for n, q in qls.items())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-5)  # init = the grid

    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for q in qls.values() for p in (q.weight, q.scale, q.zero)]
    for p in params:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    with torch.no_grad():
        qls["model.layers.0.mlp.up_proj"].zero.add_(1.0)  # move some zero points by whole steps
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert not torch.allclose(trained, ref, atol=1e-3)

    convert(model, plan)
    packed = {n: model.get_submodule(n) for n in plan.bits}
    assert all(isinstance(m, PackedLinear) for n, m in packed.items() if n != "model.embed_tokens")
    assert sum(m.packed_bytes() for m in packed.values()) == plan.n_bytes() == plan.summary["bytes"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=0, atol=1e-5)

    # the converted model writes and reloads as a packed checkpoint of the plan's bytes
    assert save_packed(model, plan, str(tmp_path / "packed")) == plan.n_bytes()
    with torch.no_grad():
        torch.testing.assert_close(
            load_packed(str(tmp_path / "packed"))(input_ids=ids).logits, trained, rtol=0, atol=1e-5
        )


def test_prepare_and_convert_refuse_mismatches():
    model = tiny_llama()
    plan = make_plan(model)
    other = make_plan(tiny_llama(), group_size=16)
    other.bits = {k: v[::-1].copy() for k, v in other.bits.items()}
    prepare(model, plan)
    with pytest.raises(BitsearchError, match="not a linear or embedding layer"):
        prepare(model, plan)  # already prepared
    with pytest.raises(BitsearchError, match="other widths"):
        convert(model, other)
    with pytest.raises(BitsearchError, match="not prepared for QAT"):
        convert(tiny_llama(), plan)


def test_frozen_codes_train_step_sizes_with_the_exact_gradient():
    """On weights already on the grid (as SignRound or GPTQ leave them) the straight-through
    step-size gradient vanishes; with the codes frozen it is the exact one, d/ds of (q - z) * s
    (checked by finite differences), and the packed form keeps the frozen codes under new scales."""
    lin, bits = make_linear((2, 3, 4, 8, 16), bias=True, seed=2)
    ql = QuantLinear(lin, bits, 16)
    with torch.no_grad():
        ql.weight.copy_(ql.dequantized_weight())  # on the grid
    x = torch.randn(6, 40, dtype=torch.float64)
    t = torch.randn(6, 32, dtype=torch.float64)

    def loss(m):
        return ((m(x.float()).double() - t) ** 2).sum()

    loss(ql).backward()
    quant = ((bits >= 2) & (bits <= 8)).unsqueeze(-1).expand_as(ql.scale)
    ste = ql.scale.grad[quant].abs().max()
    frozen = copy.deepcopy(ql)
    frozen.scale.grad = None
    frozen.freeze_codes()
    assert torch.equal(frozen.dequantized_weight(), ql.dequantized_weight())
    assert not frozen.weight.requires_grad and not frozen.zero.requires_grad
    assert frozen.weight.dtype == torch.float16  # serves only kept rows now: half the master copy
    loss(frozen).backward()
    g = frozen.scale.grad
    assert g[quant].abs().max() > 100 * ste  # the straight-through one is rounding noise only
    # finite differences in float64 of the loss through (q - z) * s for a few groups
    q = frozen.codes.double()
    z = frozen.zero.detach().double().round().unsqueeze(-1)
    s0 = frozen.scale.detach().half().double()  # the forward's float16 step (identity gradient)

    def f(s):
        w = ((q - z) * s.unsqueeze(-1)).reshape(32, -1)[:, :40]
        w = torch.where(bits.unsqueeze(-1) == 16, frozen.weight.detach().half().double(), w)
        return ((x @ w.T + frozen.bias.detach().double() - t) ** 2).sum()

    for r, c in quant.nonzero()[[0, 7, 30]].tolist():
        d = 1e-3 * float(s0[r, c])
        sp, sm = s0.clone(), s0.clone()
        sp[r, c] += d
        sm[r, c] -= d
        fd = (f(sp) - f(sm)) / (2 * d)
        torch.testing.assert_close(float(g[r, c]), float(fd), rtol=2e-2, atol=1e-3)
    with torch.no_grad():
        frozen.scale.mul_(1 + 0.2 * torch.rand(frozen.scale.shape))
    packed = frozen.to_packed()
    torch.testing.assert_close(packed(x.float()), frozen(x.float()), rtol=0, atol=1e-6)
    tensors = pack_weight(frozen.dequantized_weight(), bits, 16, *frozen.qparams())  # what to_packed stores
    for b in (2, 3, 4, 8):
        rows = (bits == b).nonzero().flatten()
        codes = unpack_codes(tensors[f"codes_b{b}"], b, 40)
        assert torch.equal(codes.to(torch.uint8), frozen.codes[rows].reshape(len(rows), -1)[:, :40])
