"""Quantizer core: the integer grid and bit packing."""

from .grid import (
    KEEP_WIDTH,
    PRUNE_WIDTH,
    QUANT_WIDTHS,
    VALID_WIDTHS,
    choose_qparams,
    dequantize,
    fake_quantize,
    n_groups,
    quantize,
)
from .packing import pack_codes, packed_row_bytes, unpack_codes

__all__ = [
    "KEEP_WIDTH",
    "PRUNE_WIDTH",
    "QUANT_WIDTHS",
    "VALID_WIDTHS",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "n_groups",
    "quantize",
    "pack_codes",
    "packed_row_bytes",
    "unpack_codes",
]
