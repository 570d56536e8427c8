"""Bit packing of b-bit codes (b = 2..8) into bytes, one byte-aligned stream per row.

Row r's K codes are written as a little-endian bit stream (bit i of code j is stream bit
j*b + i; stream bit t lives in byte t // 8 at bit t % 8), so a row takes exactly
``ceil(K * b / 8)`` bytes. Eight codes fill exactly b bytes, so both directions work on blocks
of 8 codes held in one 64-bit integer (no per-bit expansion). Pure torch functions, usable on
any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import QUANT_WIDTHS

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes"]


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of ``in_features`` codes of width ``bits`` takes."""
    return (in_features * bits + 7) // 8


def _check(bits: int) -> None:
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"packing: width {bits} is not in 2..8")


def _shifts(step: int, n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) * step


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (R, K) codes (< 2^bits) into (R, ceil(K*bits/8)) uint8."""
    _check(bits)
    rows, k = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    blocks = -(-k // 8)
    c = F.pad(codes.to(torch.int64), (0, blocks * 8 - k)).reshape(rows, blocks, 8)
    word = (c << _shifts(bits, 8, codes.device)).sum(-1, keepdim=True)  # 8 codes -> 8*bits bits
    packed = ((word >> _shifts(8, bits, codes.device)) & 0xFF).reshape(rows, blocks * bits)
    return packed[:, : packed_row_bytes(k, bits)].to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (R, nbytes) uint8 -> (R, in_features) uint8 codes."""
    _check(bits)
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features].to(torch.uint8)
    blocks = -(-in_features // 8)
    p = F.pad(packed.to(torch.int64), (0, blocks * bits - packed.shape[1])).reshape(rows, blocks, bits)
    word = (p << _shifts(8, bits, packed.device)).sum(-1, keepdim=True)  # b bytes -> 8 codes
    codes = (word >> _shifts(bits, 8, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(rows, blocks * 8)[:, :in_features].to(torch.uint8)
