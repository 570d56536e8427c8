"""The packed runtime: the fused C kernel and the torch path against the dequantized weight,
loading on the meta device, and batch-1 generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plans import mixed_plan

from bitsearch import packed as packed_mod
from bitsearch.cli import main
from bitsearch.config import GenerateConfig
from bitsearch.generate import generate, greedy_decode
from bitsearch.io.checkpoint import load_packed, packed_tensor_bytes, save_packed
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.packed import GEMV_MAX_ROWS, PackedEmbedding, PackedLinear, PackedTiedHead, unpack_weight
from bitsearch.quant import kernel as kernel_mod
from bitsearch.quant.grid import QUANT_WIDTHS
from bitsearch.quant.packing import pack_codes, packed_row_bytes, unpack_codes
from bitsearch.quantize import fake_quantize_model, pack_model

MODES = ["native", "scalar", "off"]
WIDTHS = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 16])


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """Each kernel path: SIMD C, portable C, pure torch."""
    monkeypatch.setenv("BITSEARCH_KERNEL", request.param)
    k = kernel_mod.get_kernel()
    if request.param != "off" and k is None:
        pytest.skip("no C compiler: only the torch path runs here")
    return request.param


def _bitstream_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The packing's definition, bit by bit: bit i of code j is stream bit j*bits + i."""
    rows, k = codes.shape
    out = torch.zeros(rows, packed_row_bytes(k, bits), dtype=torch.uint8)
    for r in range(rows):
        for j in range(k):
            for i in range(bits):
                if (int(codes[r, j]) >> i) & 1:
                    t = j * bits + i
                    out[r, t // 8] |= 1 << (t % 8)
    return out


@pytest.mark.parametrize("bits", QUANT_WIDTHS)
@pytest.mark.parametrize("k", [1, 7, 8, 13, 40])
def test_block_packing_matches_the_bit_stream(bits, k):
    codes = torch.randint(0, 2**bits, (3, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, _bitstream_reference(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def _random_layer(k: int, n_rows: int, gs: int, seed: int, bias: bool = True) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n_rows, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_rows, k, generator=g) * 0.1)
    bits = WIDTHS[torch.randint(0, len(WIDTHS), (n_rows,), generator=g)]
    bits[: len(WIDTHS)] = WIDTHS  # every width, pruned (0) and kept (16) included
    return lin, bits


@pytest.mark.parametrize("k,gs", [(64, 16), (384, 128), (100, -1), (37, 16), (64, 12), (24, 128)])
@pytest.mark.parametrize("n", [1, 3, GEMV_MAX_ROWS + 5])
def test_linear_equals_the_dequantized_layer(mode, k, gs, n):
    """Fused products (n <= GEMV_MAX_ROWS) and dequantize-then-matmul give the outputs of the
    layer's dequantized weight (the pure-torch reference), for every width and odd shapes."""
    lin, bits = _random_layer(k, 70, gs, seed=k + n)
    p = PackedLinear.from_linear(lin, bits, gs)
    ref_w = unpack_weight(p.packed_tensors(), k, gs)
    assert torch.equal(p.dequantized_weight(), ref_w)  # bit for bit, every path
    x = torch.randn(2, n, k)
    with torch.no_grad():
        y = p(x)
    expect = F.linear(x, ref_w, lin.bias)
    assert y.shape == expect.shape
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., bits == 0], lin.bias.detach().expand(2, n, -1)[..., bits == 0])


def test_compact_rows_and_half_precision_inputs(mode):
    """A producer keeping only its live rows, and bfloat16 activations."""
    lin, bits = _random_layer(64, 50, 32, seed=3, bias=False)
    keep = bits != 0
    p = PackedLinear.from_linear(lin, bits, 32, rows=keep)
    ref_w = unpack_weight(p.packed_tensors(), 64, 32)[keep]
    assert p.out_features == int(keep.sum()) and torch.equal(p.dequantized_weight(), ref_w)
    for n in (1, 9):
        x = torch.randn(n, 64)
        torch.testing.assert_close(p(x), F.linear(x, ref_w), rtol=1e-5, atol=1e-5)
        xb = x.to(torch.bfloat16)
        yb = p(xb)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), F.linear(xb.float(), ref_w), rtol=2e-2, atol=2e-2)


def test_gradients_take_the_torch_path(mode):
    lin, bits = _random_layer(32, 20, 16, seed=5)
    p = PackedLinear.from_linear(lin, bits, 16)
    x = torch.randn(1, 32, requires_grad=True)
    p(x).sum().backward()
    torch.testing.assert_close(x.grad, unpack_weight(p.packed_tensors(), 32, 16).sum(0, keepdim=True))


def test_embedding_lookup_and_tied_head(mode):
    emb = torch.nn.Embedding(90, 48)
    _, bits = _random_layer(48, 90, 16, seed=7)
    p = PackedEmbedding.from_embedding(emb, bits, 16)
    table = unpack_weight(p.packed_tensors(), 48, 16)
    ids = torch.tensor([[0, 5, 89, 5], [3, 1, 2, 70]])
    assert torch.equal(p(ids), F.embedding(ids, table))
    head = PackedTiedHead(p)
    for n in (1, 12):
        x = torch.randn(n, 48)
        torch.testing.assert_close(head(x), x @ table.T, rtol=1e-5, atol=1e-5)


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_mod, "_LOADED", {})
    monkeypatch.setenv("BITSEARCH_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="did not compile"):
        assert kernel_mod.get_kernel("native") is None
    monkeypatch.setenv("BITSEARCH_KERNEL", "native")
    lin, bits = _random_layer(64, 30, 32, seed=9)
    p = PackedLinear.from_linear(lin, bits, 32)
    x = torch.randn(1, 64)
    torch.testing.assert_close(p(x), F.linear(x, unpack_weight(p.packed_tensors(), 64, 32), lin.bias))


def test_tiny_llama_logits_equal_the_fake_quantized_model(mode, llama_dir):
    """Prefill (dequantize-then-matmul) and cached decoding steps (fused kernel) of a packed model
    with every width, pruned rows included, against the fake-quantized float model."""
    m = load_model(llama_dir)
    plan = mixed_plan(m, r"embed_tokens|layers\.\d+\.(self_attn|mlp)", gs=16)
    fake = fake_quantize_model(load_model(llama_dir), plan)
    packed = pack_model(m, plan)
    assert isinstance(packed.lm_head, PackedTiedHead)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, fake(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    forced = torch.randint(0, 300, (6,))
    a = greedy_decode(packed, ids, 6, forced=forced)
    b = greedy_decode(fake, ids, 6, forced=forced)
    assert a.tokens == b.tokens == forced.tolist() and a.choices == b.choices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_builds_on_meta_and_keeps_the_saved_dtype(llama_dir, tmp_path, dtype):
    m = load_model(llama_dir, dtype=dtype)
    plan = mixed_plan(m, gs=16)
    save_packed(m, plan, str(tmp_path / "p"))
    loaded = load_packed(str(tmp_path / "p"))
    assert loaded.model.embed_tokens.weight.dtype == dtype and loaded.model.norm.weight.dtype == dtype
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again after assignment
    assert not [n for n, t in loaded.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    packed = [mod for mod in loaded.modules() if isinstance(mod, PackedLinear)]
    assert packed and all(mod.compute_dtype == dtype and not hasattr(mod, "weight") for mod in packed)
    # the loaded tensors are exactly: the packed ones, the untouched ones, the rows' output positions
    # and the buffers no checkpoint stores (rotary frequencies): no float target weight survives
    from safetensors.torch import load_file

    rest = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "p" / "model.safetensors")).values())
    index = sum(b.numel() * b.element_size() for mod in packed for n, b in mod.named_buffers() if n.startswith("out_b"))
    free = sum(b.numel() * b.element_size() for n, b in loaded.named_buffers() if n.endswith("inv_freq"))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in list(loaded.parameters()) + list(loaded.buffers())
    }
    assert sum(storages.values()) == packed_tensor_bytes(str(tmp_path / "p")) + rest + index + free
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        as_float = load_packed(str(tmp_path / "p"), dtype=torch.float32)
        assert as_float.model.embed_tokens.weight.dtype == torch.float32
        expect = pack_model(load_model(llama_dir, dtype=dtype), plan)(input_ids=ids).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), expect.float(), rtol=2e-2, atol=2e-2)


def test_generate_matches_transformers_greedy(llama_dir, tmp_path):
    tok = load_tokenizer(llama_dir)
    m = load_model(llama_dir)
    cfg = GenerateConfig(max_new_tokens=8, stop_at_eos=False, threads=1)
    r = generate(m, "the quick brown fox", cfg, tokenizer=tok)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert r.timing.tokens == hf[0, ids.shape[1] :].tolist() and r.prompt_tokens == ids.shape[1]
    assert r.text == tok.decode(r.timing.tokens, skip_special_tokens=True) and r.tokens_per_s > 0

    plan = mixed_plan(m, gs=16)
    save_packed(m, plan, str(tmp_path / "p"), tok)
    from_path = generate(str(tmp_path / "p"), "the quick brown fox", cfg)
    packed = pack_model(load_model(llama_dir), plan)
    with torch.no_grad():
        hf = packed.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert from_path.timing.tokens == hf[0, ids.shape[1] :].tolist()


def test_generate_cli(llama_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                llama_dir,
                "--prompt",
                "the quick",
                "--max-new-tokens",
                "4",
                "--no-stop-at-eos",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("the quick") and "4 new tokens" in err and "tokens/s" in err
    assert main(["generate", "--model", llama_dir, "--prompt", "x", "--threads", "0"]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err
    assert main(["generate", "--model", llama_dir, "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


def test_scratch_made_in_inference_mode_serves_later_calls(mode, monkeypatch):
    monkeypatch.setattr(packed_mod._SCRATCH, "buffer", None, raising=False)
    lin, bits = _random_layer(40, 32, 16, seed=11)
    p = PackedLinear.from_linear(lin, bits, 16)
    x = torch.randn(GEMV_MAX_ROWS + 3, 40)
    expect = F.linear(x, unpack_weight(p.packed_tensors(), 40, 16), lin.bias)
    with torch.inference_mode():
        torch.testing.assert_close(p(x), expect)
    with torch.no_grad():
        torch.testing.assert_close(p(x), expect)


def test_copies_and_moves_do_not_share_kernel_pointers(mode):
    import copy
    import pickle

    lin, bits = _random_layer(32, 24, 16, seed=13)
    p = PackedLinear.from_linear(lin, bits, 16)
    x = torch.randn(1, 32)
    with torch.no_grad():
        y = p(x)  # builds the layer's kernel view
        twin = copy.deepcopy(p)
        torch.testing.assert_close(twin(x), y)
        for t in twin.packed_tensors().values():  # the copy computes from its own tensors
            t.zero_()
        assert torch.equal(twin(x), lin.bias.detach().expand_as(y)) and torch.equal(p(x), y)
        torch.testing.assert_close(pickle.loads(pickle.dumps(p))(x), y)
        moved = p.to(torch.float64)  # buffers replaced (float16 scales become float64)
        assert moved._slices is None
        for n in (1, GEMV_MAX_ROWS + 1):  # the kernel reads float16 scales: the torch path runs
            xd = torch.randn(n, 32, dtype=torch.float64)
            torch.testing.assert_close(
                moved(xd), F.linear(xd, unpack_weight(p.packed_tensors(), 32, 16).double(), lin.bias.detach().double())
            )
