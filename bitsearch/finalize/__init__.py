"""Finalize a bit plan: quantization-aware training (:mod:`.train`) of fake-quantized layers
with trainable weights, step sizes and zero points (:mod:`.quantizer`) under the rounding /
clamping surrogate gradients of :mod:`.surrogates`, or SignRound's learned rounding
(:mod:`.signround`), or GPTQ (:mod:`.gptq`); :mod:`.registry` has them by name."""

from .quantizer import QuantLinear, convert, fake_quant_rows, prepare
from .gptq import GPTQSettings, gptq_quantize
from .registry import FINALIZERS, finalize_model, get_finalizer, register_finalizer
from .signround import SignRoundSettings, signround
from .surrogates import (CLAMP_MODES, ROUND_MODES, clamp_codes, round_ste, round_surrogate, soft_clamp,
                         soft_clamp_grad, soft_round, soft_round_grad, straight_through)
from .train import MODES, QatSettings, finalize_qat

__all__ = ["GPTQSettings", "gptq_quantize", "FINALIZERS", "finalize_model", "get_finalizer", "register_finalizer",
           "QuantLinear", "convert", "fake_quant_rows", "prepare", "SignRoundSettings", "signround", "MODES",
           "QatSettings", "finalize_qat", "CLAMP_MODES", "ROUND_MODES", "clamp_codes", "round_ste",
           "round_surrogate", "soft_clamp", "soft_clamp_grad", "soft_round", "soft_round_grad", "straight_through"]
