"""compressed-tensors export: a per-module plan as an HF checkpoint that transformers loads.

Format ``pack-quantized`` (the ``compressed-tensors`` package, >= 0.20.1 for widths 3, 5, 6, 7),
one config group per (width, group size), each naming its modules exactly. Per quantized Linear
with R output rows, K inputs, width b and group size G (n_g = K / G groups a row, one for G = -1):

    weight_packed      int32 (R, ceil(K*b/32))   codes, offset to unsigned, packed along K
    weight_scale       float16 (R, n_g)
    weight_zero_point  layout "block": int8 (R, n_g), signed;
                       layout "group": int32 (ceil(R*b/32), n_g), offset to unsigned, packed along R
    weight_shape       int64 (2,)                [R, K]

Layouts: "group" (strategy group, or channel for G = -1) is what llm-compressor writes and vLLM
reads; transformers (5.25, compressed-tensors 0.20.1) sizes the zero points of that layout
unpacked when it loads, and refuses the file. "block" (strategy block, block_structure [1, G]: the
same groups) keeps the zero points unpacked, and transformers loads it; it is the default.

Packing: the b-bit unsigned values of a row form a little-endian bit stream (value j at bits
j*b .. j*b+b-1, crossing word boundaries), stored as little-endian int32 words; that is bitsearch's
own byte stream (``quant/packing.py``) padded to whole words. The format's integer is signed,
q_s = u - 2^(b-1), and it dequantizes (q_s - z_s) * scale, in the dtype of the loaded scale.
bitsearch's grid dequantizes (q - z) * scale with q, z in [0, 2^b - 1]: storing u = q and
z_s = z - 2^(b-1) gives q_s - z_s = q - z, so the weights are the same bit for bit when the model
is loaded in float32 (an fp16 scale times an integer below 2^9 is exact there).

Targets at width 16 are written in float16 and stay out of every config group (plain Linear);
pruned rows (width 0) and rows of different widths within a module have no equivalent and are
refused, as are embedding targets and group sizes that do not divide a module's inputs.
A model whose targets are packed (a ``finalize`` or ``apply`` checkpoint) exports its stored
codes, scales and zero points unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitsearchError
from ..quant.grid import KEEP_WIDTH, QUANT_WIDTHS, n_groups
from ..quant.packing import pack_codes
from .base import Exporter, register_exporter
from .hf_checkpoint import (
    float16_weight,
    int32_words,
    module_widths,
    other_tensors,
    pack_int32,
    plan_modules,
    quant_tensors,
    write_checkpoint,
)

__all__ = ["CompressedTensorsExporter", "module_bytes"]

FORMAT = "compressed-tensors"
SCALE_BYTES = 2
SHAPE_BYTES = 16  # weight_shape: two int64
_WORD = 4
LAYOUTS = ("block", "group")


def module_bytes(out_features: int, in_features: int, bits: int, group_size: int, layout: str = "block") -> int:
    """Bytes the format stores for one Linear at one width (tensor data, headers excluded)."""
    if bits == KEEP_WIDTH:
        return 2 * out_features * in_features
    if bits not in QUANT_WIDTHS:
        raise BitsearchError(f"compressed-tensors stores widths 2..8 and 16, not {bits}")
    ng = n_groups(in_features, group_size)
    zeros = out_features * ng if layout == "block" else _WORD * ng * int32_words(out_features, bits)
    return _WORD * out_features * int32_words(in_features, bits) + SCALE_BYTES * out_features * ng + zeros + SHAPE_BYTES


def _tensors(name: str, mod: nn.Module, bits: int, group_size: int, layout: str) -> dict[str, torch.Tensor]:
    """The format's four tensors of one quantized module."""
    t = quant_tensors(mod, bits, group_size)
    rows, k = t["scales"].shape[0], mod.in_features
    if layout == "block":
        zeros = (t["zeros"].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    else:
        zeros = pack_int32(pack_codes(t["zeros"].t().contiguous(), bits)).t()
    return {
        f"{name}.weight_packed": pack_int32(t["codes"]),
        f"{name}.weight_scale": t["scales"].to(torch.float16).contiguous(),
        f"{name}.weight_zero_point": zeros.contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, k], dtype=torch.int64),
    }


def _scheme(targets: list[str], bits: int, group_size: int, in_features: int, layout: str) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False}
    per_row = group_size == -1 or group_size >= in_features
    if layout == "block":
        weights.update(strategy="block", block_structure=[1, in_features if per_row else group_size])
    elif per_row:
        weights.update(strategy="channel")
    else:
        weights.update(strategy="group", group_size=group_size)
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": "pack-quantized",
    }


def quantization_config(
    widths: dict[str, int], in_features: dict[str, int], group_size: int, layout: str = "block"
) -> dict:
    """The ``quantization_config`` of config.json: one group per scheme, exact module names."""
    schemes: dict[tuple, list[str]] = {}
    for name, b in widths.items():
        if b == KEEP_WIDTH:
            continue
        per_row = group_size == -1 or group_size >= in_features[name]
        if not per_row and in_features[name] % group_size:
            raise BitsearchError(
                f"layer '{name}' has {in_features[name]} inputs, not a multiple of the group size "
                f"{group_size}, which compressed-tensors requires"
            )
        # a whole-row block spans the module's own inputs: one scheme per input size
        key = (b, -1 if per_row else group_size, in_features[name] if per_row and layout == "block" else 0)
        schemes.setdefault(key, []).append(name)
    groups = {}
    for i, ((b, g, _), names) in enumerate(sorted(schemes.items())):
        groups[f"group_{i}"] = _scheme(names, b, g, in_features[names[0]], layout)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


@register_exporter
class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = "HF checkpoint in compressed-tensors pack-quantized (transformers loads it); per-module plans"
    plan_unit = "module"
    config_options = ("layout",)

    def __init__(self, layout: str = "block"):
        if layout not in LAYOUTS:
            raise BitsearchError(f"compressed-tensors layout '{layout}' is not one of {', '.join(LAYOUTS)}")
        self.layout = layout

    def module_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        return module_bytes(out_features, in_features, bits, group_size, self.layout)

    def export(self, model: nn.Module, tokenizer, plan, out: str) -> dict:
        widths = module_widths(plan, FORMAT)
        modules = plan_modules(model, plan, FORMAT)
        in_features = {n: m.in_features for n, m in modules.items()}
        qcfg = quantization_config(widths, in_features, plan.group_size, self.layout)
        tensors, quant_bytes = {}, 0
        for name, mod in modules.items():
            if widths[name] == KEEP_WIDTH:
                part = {f"{name}.weight": float16_weight(mod)}
            else:
                part = _tensors(name, mod, widths[name], plan.group_size, self.layout)
            quant_bytes += sum(t.numel() * t.element_size() for t in part.values())
            tensors.update(part)
        tensors.update(other_tensors(model, set(modules)))
        write_checkpoint(model, tokenizer, tensors, qcfg, out)
        predicted = sum(self.module_bytes(*plan.shapes[n], widths[n], plan.group_size) for n in widths)
        return {
            "out": out,
            "target_bytes": quant_bytes,
            "predicted_target_bytes": predicted,
            "config_groups": len(qcfg["config_groups"]),
        }
