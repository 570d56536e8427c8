"""Bit packing of b-bit codes (b = 2..8) into bytes, one byte-aligned stream per row.

Row r's K codes are written as a little-endian bit stream (bit i of code j is stream bit
j*b + i; stream bit t lives in byte t // 8 at bit t % 8), so a row takes exactly
``ceil(K * b / 8)`` bytes. Pure torch functions, usable on any device.
"""

from __future__ import annotations

import torch

from .grid import QUANT_WIDTHS

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes"]


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of ``in_features`` codes of width ``bits`` takes."""
    return (in_features * bits + 7) // 8


def _check(bits: int) -> None:
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"packing: width {bits} is not in 2..8")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (R, K) codes (< 2^bits) into (R, ceil(K*bits/8)) uint8."""
    _check(bits)
    rows, k = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)
    nbytes = packed_row_bytes(k, bits)
    pad = nbytes * 8 - k * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(rows, pad)], dim=1)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.reshape(rows, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (R, nbytes) uint8 -> (R, in_features) uint8 codes."""
    _check(bits)
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :in_features].to(torch.uint8)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)
    stream = stream[:, : in_features * bits].reshape(rows, in_features, bits)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.uint8)
