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

import json
import math
import os

import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import BitsearchError
from ..packed import PackedLinear, pack_weight
from ..quant.grid import KEEP_WIDTH, QUANT_WIDTHS, n_groups
from ..quant.packing import pack_codes
from .base import Exporter, register_exporter

__all__ = ["CompressedTensorsExporter", "module_bytes", "pack_int32", "module_widths"]

WEIGHTS_FILE = "model.safetensors"
SCALE_BYTES = 2
SHAPE_BYTES = 16  # weight_shape: two int64
_WORD = 4
LAYOUTS = ("block", "group")


def _words(n_values: int, bits: int) -> int:
    return math.ceil(n_values * bits / 32)


def module_bytes(out_features: int, in_features: int, bits: int, group_size: int, layout: str = "block") -> int:
    """Bytes the format stores for one Linear at one width (tensor data, headers excluded)."""
    if bits == KEEP_WIDTH:
        return 2 * out_features * in_features
    if bits not in QUANT_WIDTHS:
        raise BitsearchError(f"compressed-tensors stores widths 2..8 and 16, not {bits}")
    ng = n_groups(in_features, group_size)
    zeros = out_features * ng if layout == "block" else _WORD * ng * _words(out_features, bits)
    return _WORD * out_features * _words(in_features, bits) + SCALE_BYTES * out_features * ng + zeros + SHAPE_BYTES


def pack_int32(packed_bytes: torch.Tensor) -> torch.Tensor:
    """(R, n) uint8 little-endian bit streams -> (R, ceil(n/4)) int32 words (zero padded)."""
    rows, n = packed_bytes.shape
    pad = -n % _WORD
    if pad:
        packed_bytes = torch.cat([packed_bytes, packed_bytes.new_zeros(rows, pad)], dim=1)
    as_le = packed_bytes.contiguous().numpy().view("<i4")
    return torch.from_numpy(as_le.astype("=i4", copy=True)).reshape(rows, -1)


def module_widths(plan) -> dict[str, int]:
    """One width per target of a per-module plan; refuses a plan whose rows differ in a module."""
    out = {}
    for name, bits in plan.bits.items():
        widths = sorted(set(int(b) for b in bits))
        if len(widths) != 1:
            raise BitsearchError(
                f"layer '{name}' has rows at widths {widths}: compressed-tensors stores one "
                f"width per module; search with --format compressed-tensors (per-module plans)"
            )
        if widths[0] == 0:
            raise BitsearchError(f"layer '{name}' is pruned (width 0), which compressed-tensors cannot store")
        out[name] = widths[0]
    return out


def _targets(model: nn.Module, plan) -> dict[str, nn.Module]:
    """The plan's modules in ``model`` (Linear or PackedLinear), of the plan's shapes (which model
    the plan was made for is ``api.export``'s check)."""
    modules = dict(model.named_modules())
    found = {}
    for name, planned in plan.shapes.items():
        mod = modules.get(name)
        if isinstance(mod, PackedLinear):
            if mod.compact:
                raise BitsearchError(f"layer '{name}' has pruned rows, which compressed-tensors cannot store")
            shape = (mod.n_rows, mod.in_features)
        elif isinstance(mod, nn.Linear):
            shape = tuple(mod.weight.shape)
        else:
            kind = type(mod).__name__ if mod is not None else "missing"
            raise BitsearchError(f"layer '{name}' is {kind}: compressed-tensors export covers Linear targets only")
        if shape != planned:
            raise BitsearchError(
                f"plan: layer '{name}' is {planned[0]}x{planned[1]} in the plan but {shape[0]}x{shape[1]} in the model"
            )
        found[name] = mod
    return found


def _quant_tensors(mod: nn.Module, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """codes (packed bytes), scales and zeros of one module at one width, from its packed
    buffers (learned parameters kept) or from the min-max grid."""
    if isinstance(mod, PackedLinear):
        stored = mod.packed_tensors()
        if not bool((stored["qbits"] == bits).all()):
            raise BitsearchError("a packed layer's stored widths differ from the plan's")
        if mod.group_size != group_size:
            raise BitsearchError(f"a packed layer has group size {mod.group_size}, the plan {group_size}")
    else:
        stored = pack_weight(mod.weight, torch.full((mod.out_features,), bits), group_size)
    return {k: stored[f"{k}_b{bits}"].cpu() for k in ("codes", "scales", "zeros")}


def _tensors(name: str, mod: nn.Module, bits: int, group_size: int, layout: str) -> dict[str, torch.Tensor]:
    """The format's four tensors of one quantized module."""
    t = _quant_tensors(mod, bits, group_size)
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


def _rest(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every other tensor of the model, a tied tensor once (transformers ties it again)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if module in skip and leaf != "bias":
            continue
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


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
        from safetensors.torch import save_file

        widths = module_widths(plan)
        modules = _targets(model, plan)
        in_features = {n: m.in_features for n, m in modules.items()}
        qcfg = quantization_config(widths, in_features, plan.group_size, self.layout)
        tensors, quant_bytes = {}, 0
        for name, mod in modules.items():
            if widths[name] == KEEP_WIDTH:
                w = mod.dequantized_weight() if isinstance(mod, PackedLinear) else mod.weight
                part = {f"{name}.weight": w.detach().cpu().to(torch.float16).contiguous()}
            else:
                part = _tensors(name, mod, widths[name], plan.group_size, self.layout)
            quant_bytes += sum(t.numel() * t.element_size() for t in part.values())
            tensors.update(part)
        tensors.update(_rest(model, set(modules)))
        dtype = str(getattr(model, "dtype", torch.float32)).replace("torch.", "")
        with atomic_dir(out) as tmp:
            save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            cfg_path = os.path.join(tmp, "config.json")
            with open(cfg_path) as f:
                config = json.load(f)
            config.pop("torch_dtype", None)
            config.update(quantization_config=qcfg, dtype=dtype)
            with open(cfg_path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        predicted = sum(self.module_bytes(*plan.shapes[n], widths[n], plan.group_size) for n in widths)
        return {
            "out": out,
            "target_bytes": quant_bytes,
            "predicted_target_bytes": predicted,
            "config_groups": len(qcfg["config_groups"]),
        }
