"""Asymmetric integer grid, per channel or per group of G input weights.

For a group of weights x (one output row, or G consecutive input weights of it) and a width
b in 2..8 (min-max, with the range widened to contain 0 as GPTQ's quantizer does):

    lo = min(min(x), 0), hi = max(max(x), 0)
    scale = (hi - lo) / (2^b - 1)                   (stored as float16)
    zero  = clamp(round(-lo / scale), 0, 2^b - 1)   (integer zero point, stored as uint8)
    q = clamp(round(x / scale) + zero, 0, 2^b - 1)  (the b-bit code)
    x_hat = (q - zero) * scale

0 is exactly representable (zero weights, pruned rows and padding stay exactly zero). The scale is
rounded to float16 *before* zero and codes are chosen, so what the search measures is exactly
what ``apply`` writes and ``PackedLinear`` reconstructs. Widths: 0 means
the row is pruned (x_hat = 0), 16 means the row is kept in float16. These are pure functions
on tensors, in the style of gpt-fast's ``choose_qparams / quantize / dequantize``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "QUANT_WIDTHS",
    "KEEP_WIDTH",
    "PRUNE_WIDTH",
    "VALID_WIDTHS",
    "n_groups",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
]

QUANT_WIDTHS = (2, 3, 4, 5, 6, 7, 8)
PRUNE_WIDTH = 0
KEEP_WIDTH = 16
VALID_WIDTHS = (PRUNE_WIDTH,) + QUANT_WIDTHS + (KEEP_WIDTH,)
_F16_MAX = torch.finfo(torch.float16).max


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups per row; ``group_size=-1`` means one group per row."""
    if group_size == -1 or group_size >= in_features:
        return 1
    return math.ceil(in_features / group_size)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, K) -> (R, n_groups, G), padding a partial last group by repeating its last value."""
    rows, k = w.shape
    g = k if (group_size == -1 or group_size >= k) else group_size
    ng = math.ceil(k / g)
    pad = ng * g - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, ng, g)


def ungrouped(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def choose_qparams(w: torch.Tensor, bits: int, group_size: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max parameters for rows ``w`` (R, K): (scale float16, zero uint8), each (R, n_groups)."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"choose_qparams: width {bits} is not in 2..8")
    wg = grouped(w.float(), group_size)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(max=_F16_MAX).to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    zero = torch.round(-lo / s).clamp_(0, 2**bits - 1).to(torch.uint8)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Codes (R, K) uint8 in [0, 2^bits - 1] for rows ``w`` under the given parameters."""
    wg = grouped(w.float(), group_size)
    s = scale.float().unsqueeze(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (torch.round(wg / s) + zero.float().unsqueeze(-1)).clamp_(0, 2**bits - 1)
    return ungrouped(q, w.shape[1]).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows (R, K) reconstructed from codes and per-group parameters."""
    k = codes.shape[1]
    qg = grouped(codes.to(torch.float32), group_size)
    w = (qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return ungrouped(w, k).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Quantize-dequantize rows ``w`` at one width (0 = zeros, 16 = float16 round trip)."""
    if bits == PRUNE_WIDTH:
        return torch.zeros_like(w)
    if bits == KEEP_WIDTH:
        return w.to(torch.float16).to(w.dtype)
    scale, zero = choose_qparams(w, bits, group_size)
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size, dtype=w.dtype)
