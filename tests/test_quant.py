"""Quantizer core: grid properties and packing round trips (pure functions, tiny tensors)."""

import pytest
import torch

from bitsearch.quant import (
    QUANT_WIDTHS,
    choose_qparams,
    dequantize,
    fake_quantize,
    n_groups,
    pack_codes,
    packed_row_bytes,
    quantize,
    unpack_codes,
)


@pytest.mark.parametrize("bits", QUANT_WIDTHS)
@pytest.mark.parametrize("group_size", [-1, 8, 16, 5])
def test_grid_error_within_half_step(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(6, 37)
    scale, zero = choose_qparams(w, bits, group_size)
    assert scale.dtype == torch.float16 and scale.shape == (6, n_groups(37, group_size))
    q = quantize(w, scale, zero, bits, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    w_hat = dequantize(q, scale, zero, group_size)
    g = 37 if group_size == -1 else group_size
    step = scale.float().repeat_interleave(g, dim=1)[:, :37]
    # inside the grid: half a step; the integer zero point shifts the grid by up to half a
    # step, so the extremes may be off by one step
    err = (w - w_hat).abs()
    assert (err <= step * 1.001 + 1e-6).all()
    assert (err <= step / 2 * 1.001 + 1e-6).float().mean() > 0.9


def test_zero_is_exact_and_constant_rows():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    w[:, ::3] = 0.0
    for b in QUANT_WIDTHS:
        assert (fake_quantize(w, b, 8)[:, ::3] == 0).all()  # 0 is on every grid
    c = torch.full((1, 4), 3.0)
    assert torch.allclose(fake_quantize(c, 2, -1), c)  # range [0, 3]: 3 is the top code
    assert (fake_quantize(torch.zeros(1, 4), 3, -1) == 0).all()


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    errs = [(w - fake_quantize(w, b, 16)).pow(2).sum().item() for b in QUANT_WIDTHS]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert fake_quantize(w, 0, 16).abs().sum() == 0
    assert torch.allclose(fake_quantize(w, 16, 16), w, atol=1e-3)


@pytest.mark.parametrize("bits", QUANT_WIDTHS)
@pytest.mark.parametrize("k", [1, 7, 8, 13, 64])
def test_pack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_layout_is_little_endian_stream():
    # codes 1, 2, 3 at 2 bits -> bits 10 01 11 -> byte 0b00111001
    packed = pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[0b00111001]]


def test_invalid_width_rejected():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        choose_qparams(torch.zeros(1, 4), 1)
