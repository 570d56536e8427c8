"""Finalize a bit plan: quantization-aware training (:mod:`.train`) of fake-quantized layers
with trainable weights, step sizes and zero points (:mod:`.quantizer`) under the rounding /
clamping surrogate gradients of :mod:`.surrogates`, SignRound's learned rounding
(:mod:`.signround`) or GPTQ (:mod:`.gptq`); :mod:`.base` has them by name, :mod:`.qat` registers
QAT and :mod:`.recipes` holds the defaults."""

from .base import FINALIZERS, Finalizer, Rounder, get_finalizer, register_finalizer, rounders
from .gptq import GPTQSettings, gptq_quantize
from .qat import QatFinalizer, qat_settings
from .quantizer import QuantLinear, convert, fake_quant_rows, prepare
from .signround import SignRoundSettings, signround
from .surrogates import (
    CLAMP_MODES,
    ROUND_MODES,
    clamp_codes,
    round_ste,
    round_surrogate,
    soft_clamp,
    soft_clamp_grad,
    soft_round,
    soft_round_grad,
    straight_through,
)
from .train import MODES, QatSettings, finalize_qat

__all__ = [
    "FINALIZERS",
    "Finalizer",
    "Rounder",
    "get_finalizer",
    "register_finalizer",
    "rounders",
    "GPTQSettings",
    "gptq_quantize",
    "QatFinalizer",
    "qat_settings",
    "QuantLinear",
    "convert",
    "fake_quant_rows",
    "prepare",
    "SignRoundSettings",
    "signround",
    "MODES",
    "QatSettings",
    "finalize_qat",
    "CLAMP_MODES",
    "ROUND_MODES",
    "clamp_codes",
    "round_ste",
    "round_surrogate",
    "soft_clamp",
    "soft_clamp_grad",
    "soft_round",
    "soft_round_grad",
    "straight_through",
]
