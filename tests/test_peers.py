"""Peer quantizers (studies/reference/peers.py) on a tiny random Llama: HQQ, AutoRound and AutoScheme write
b-bit decodes (at most 2^b distinct values per row-group) into the decoder-block linears only,
keep plain nn.Linear modules, count their bytes as their own storage does, and leave a model
that runs. HQQ's weights are exactly what ``HQQLinear`` (its default config) decodes;
AutoScheme's per-layer widths fit the budget by our byte count.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_peers.py
"""

import itertools
import math
import os
from collections import Counter

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bitsearch.models import find_targets
from studies.reference import peers


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights, as the shared fixtures do
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def snapshot(model):
    """Weights of the linears and embeddings, and every module's attribute names."""
    weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    }
    return weights, {n: set(vars(m)) for n, m in model.named_modules()}


def max_distinct_per_group(w: torch.Tensor, group: int) -> int:
    out = 0
    for lo in range(0, w.shape[1], group):
        block = w[:, lo : lo + group]
        out = max(out, max(len(torch.unique(row)) for row in block))
    return out


def expected_bytes(model, bits, group, meta_bits):
    """Codes padded to whole bytes per row + meta_bits per group; ``bits``: one width or
    {target: width}, ``meta_bits``: a number or a function of the width."""
    total = 0
    for t in find_targets(model):
        b = bits[t.name] if isinstance(bits, dict) else bits
        meta = meta_bits(b) if callable(meta_bits) else meta_bits
        total += t.out_features * (8 * math.ceil(t.in_features * b / 8) + math.ceil(t.in_features / group) * meta)
    return math.ceil(total / 8)


def autoround_inputs(tokenizer_dir, model_seed: int, batch_seed: int):
    """(tokenizer, tiny Llama, its snapshot, a 4 x 32 token batch); skips without auto-round."""
    pytest.importorskip("auto_round")
    from transformers import AutoTokenizer

    model = tiny_llama(model_seed)
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(batch_seed))
    return AutoTokenizer.from_pretrained(tokenizer_dir), model, snapshot(model), batch


def assert_left_as_found(model):
    """requires_grad, eval mode, no hooks, no gradient checkpointing, no forward overrides."""
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in vars(m) and "orig_forward" not in vars(m)


def check_model(model, state, bits, group):
    """Targets: plain nn.Linear with at most 2^bits values per row-group (``bits``: one width, or
    {target: width}), changed but close; everything else untouched; no attribute left on any
    module; logits finite."""
    before, attrs = state
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    names = {t.name for t in find_targets(model)}
    assert len(names) == 14
    for name, w0 in before.items():
        mod = model.get_submodule(name)
        assert type(mod) in (nn.Linear, nn.Embedding)
        w = mod.weight.detach()
        assert w.dtype == torch.float32 and w.shape == w0.shape
        if name not in names:
            assert torch.equal(w, w0), f"{name} changed"
            continue
        assert max_distinct_per_group(w, group) <= 2 ** (bits[name] if isinstance(bits, dict) else bits), name
        rel = float((w - w0).norm() / w0.norm())
        assert 0.0 < rel < 0.6, (name, rel)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 16))).logits
    assert torch.isfinite(logits).all()


def test_available_names_both_peers():
    got = peers.available()
    assert set(got) == {"hqq", "autoround"}
    assert all(v is None or isinstance(v, str) for v in got.values())


def test_hqq_w3_g32():
    pytest.importorskip("hqq")
    model = tiny_llama()
    before = snapshot(model)
    info = peers.hqq_quantize(model, bits=3, group_size=32)
    check_model(model, before, 3, 32)
    n = sum(t.numel for t in find_targets(model))
    assert info["stored_bytes"] == expected_bytes(model, 3, 32, 32) == n * (3 + 32 / 32) / 8
    assert info["avg_bits"] == pytest.approx(4.0)
    assert info["config"] == "HQQ W3 g32" and info["seconds"] > 0
    # HQQ's own 3-bit packing: 10 codes per int32 (3.2 bits) + float16 scale and zero
    assert info["packed_bytes"] > info["stored_bytes"]
    rel = [
        float((model.get_submodule(t.name).weight.detach() - before[0][t.name]).norm() / before[0][t.name].norm())
        for t in find_targets(model)
    ]
    assert 0.05 < sum(rel) / len(rel) < 0.3


def test_hqq_matches_hqqlinear():
    """The written weight is what HQQLinear (default config, float16 compute) decodes."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = tiny_llama(1)
    name = "model.layers.1.mlp.down_proj"
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(model.get_submodule(name).weight)
    peers.hqq_quantize(model, bits=2, group_size=64)
    ref = (
        HQQLinear(lin, BaseQuantizeConfig(nbits=2, group_size=64), compute_dtype=torch.float16, device="cpu")
        .dequantize()
        .float()
    )
    got = model.get_submodule(name).weight.detach()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)


def test_hqq_ragged_groups():
    """in_features not a multiple of the group size: each row ends with one shorter group."""
    pytest.importorskip("hqq")
    model = tiny_llama(2)
    before = snapshot(model)
    info = peers.hqq_quantize(model, bits=2, group_size=48)
    check_model(model, before, 2, 48)
    assert info["stored_bytes"] == expected_bytes(model, 2, 48, 32)
    for t in find_targets(model):
        w = model.get_submodule(t.name).weight.detach()
        assert max_distinct_per_group(w[:, :48], 48) <= 4 and max_distinct_per_group(w[:, 48:], 48) <= 4


def test_autoround_w2_g32(tokenizer_dir):
    tok, model, before, batch = autoround_inputs(tokenizer_dir, 3, 0)
    info = peers.autoround_quantize(model, tok, batch, bits=2, group_size=32, iters=3, seed=0)
    check_model(model, before, 2, 32)
    n = sum(t.numel for t in find_targets(model))
    assert info["stored_bytes"] == expected_bytes(model, 2, 32, 18) == n * (2 + 18 / 32) / 8
    assert info["avg_bits"] == pytest.approx(2.5625)
    assert info["config"] == "AutoRound W2 g32" and info["seconds"] > 0
    assert_left_as_found(model)


def test_autoround_symmetric_w2_g32(tokenizer_dir, monkeypatch):
    """sym=True (AutoRound's default): one zero point for every group of a layer, same bytes."""
    tok, model, before, batch = autoround_inputs(tokenizer_dir, 3, 0)
    zero_points, check = {}, peers._check_autoround_layer

    def spy(name, mod, bits, group_size):
        zero_points[name] = mod.zp
        return check(name, mod, bits, group_size)

    monkeypatch.setattr(peers, "_check_autoround_layer", spy)
    info = peers.autoround_quantize(model, tok, batch, bits=2, group_size=32, iters=3, seed=0, sym=True)
    check_model(model, before, 2, 32)
    assert len(zero_points) == 14 and set(zero_points.values()) == {2}  # one int zero point: 2^(b-1)
    assert info["stored_bytes"] == expected_bytes(model, 2, 32, 18) and info["config"] == "AutoRound sym W2 g32"
    assert info["sym"] is True
    assert_left_as_found(model)


def test_autoscheme_target_fits_budget_with_padded_rows():
    """Rows whose codes do not fill whole bytes: any choice AutoScheme's DP may make under the
    target (its count <= int(n * target)) fits the budget by ours; too small a budget raises."""
    shapes, widths, group = [(4, 100), (6, 36), (3, 250)], [2, 3, 4], 32
    n = sum(o * i for o, i in shapes)

    def ours_bits(choice):
        return sum(peers.storage_bits([s], b, group, 16 + b) for s, b in zip(shapes, choice))

    def ours(choice):
        return math.ceil(ours_bits(choice) / 8)

    def theirs(choice):
        return sum(o * i * b + o * math.ceil(i / group) * (16 + b) for (o, i), b in zip(shapes, choice))

    choices = list(itertools.product(widths, repeat=len(shapes)))
    assert any(ours_bits(c) > theirs(c) for c in choices)  # the padding matters here
    for budget in range(ours((2, 2, 2)), ours((4, 4, 4)) + 2):
        target = peers._autoscheme_target(shapes, widths, group, budget)
        allowed = [c for c in choices if theirs(c) <= int(n * target)]
        assert allowed and all(ours(c) <= budget for c in allowed), budget
    with pytest.raises(peers.BudgetTooSmall, match="below its cheapest option"):
        peers._autoscheme_target(shapes, widths, group, ours((2, 2, 2)) - 1)


def test_autoscheme_mixed_widths_within_budget(tokenizer_dir):
    tok, model, before, batch = autoround_inputs(tokenizer_dir, 4, 1)
    # W2 g32: 2.5625 bits per weight, W3: 3.59375, W4: 4.625
    info = peers.autoscheme_quantize(model, tok, batch, 3.0, group_size=32, iters=2, batch_size=2)
    widths = info["widths"]
    targets = find_targets(model)
    assert set(widths) == {t.name for t in targets}
    assert set(widths.values()) <= {2, 3, 4} and len(set(widths.values())) > 1
    check_model(model, before, widths, 32)
    n = sum(t.numel for t in targets)
    ours = expected_bytes(model, widths, 32, lambda b: 16 + b)
    assert info["stored_bytes"] == ours <= info["budget_bytes"] == math.floor(3.0 * n / 8)
    assert 2.5625 < info["avg_bits"] <= 3.0
    counts = Counter(widths.values())
    assert info["config"] == "AutoScheme " + " ".join(f"W{b}:{counts[b]}" for b in sorted(counts)) + " g32"
    assert 0 < info["search_seconds"] < info["seconds"]
    assert_left_as_found(model)


def test_autoscheme_budget_below_cheapest_option_raises(tokenizer_dir):
    tok, model, before, batch = autoround_inputs(tokenizer_dir, 4, 1)
    with pytest.raises(peers.BudgetTooSmall, match="below its cheapest option: every target at W2 g32"):
        peers.autoscheme_quantize(model, tok, batch, 2.5, group_size=32)
    assert all(torch.equal(model.get_submodule(k).weight, w) for k, w in before[0].items())
