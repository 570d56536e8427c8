"""Finalize a bit plan with quantization-aware training: fake-quantized layers with trainable
weights, step sizes and zero points (:mod:`.quantizer`) and the rounding / clamping surrogate
gradients they train with (:mod:`.surrogates`)."""

from .quantizer import QuantLinear, convert, fake_quant_rows, prepare
from .surrogates import (CLAMP_MODES, ROUND_MODES, clamp_codes, round_ste, round_surrogate, soft_clamp,
                         soft_clamp_grad, soft_round, soft_round_grad, straight_through)

__all__ = ["QuantLinear", "convert", "fake_quant_rows", "prepare", "CLAMP_MODES", "ROUND_MODES", "clamp_codes",
           "round_ste", "round_surrogate", "soft_clamp", "soft_clamp_grad", "soft_round", "soft_round_grad",
           "straight_through"]
