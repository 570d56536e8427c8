"""What the per-module HF checkpoint formats (compressed-tensors, GPTQ) share: one width per
module read from a plan, the plan's modules found in the model, their codes, scales and zero
points (from a packed checkpoint, or bitsearch's min-max grid), the model's other tensors, bit
streams as int32 words, and the checkpoint folder itself (safetensors, config.json with a
``quantization_config``, generation config, tokenizer).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import BitsearchError
from ..packed import PackedLinear, pack_weight

__all__ = [
    "WEIGHTS_FILE",
    "int32_words",
    "pack_int32",
    "module_widths",
    "plan_modules",
    "quant_tensors",
    "float16_weight",
    "other_tensors",
    "write_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"
_WORD = 4


def int32_words(n_values: int, bits: int) -> int:
    """32-bit words that ``n_values`` values of ``bits`` bits take as one dense bit stream."""
    return -(-n_values * bits // 32)


def pack_int32(packed_bytes: torch.Tensor) -> torch.Tensor:
    """(R, n) uint8 little-endian bit streams -> (R, ceil(n/4)) int32 words (zero padded)."""
    rows, n = packed_bytes.shape
    pad = -n % _WORD
    if pad:
        packed_bytes = torch.cat([packed_bytes, packed_bytes.new_zeros(rows, pad)], dim=1)
    as_le = packed_bytes.contiguous().numpy().view("<i4")
    return torch.from_numpy(as_le.astype("=i4", copy=True)).reshape(rows, -1)


def module_widths(plan, format: str = "compressed-tensors") -> dict[str, int]:
    """One width per target of a per-module plan; refuses a plan whose rows differ in a module."""
    out = {}
    for name, bits in plan.bits.items():
        widths = sorted(set(int(b) for b in bits))
        if len(widths) != 1:
            raise BitsearchError(
                f"layer '{name}' has rows at widths {widths}: {format} stores one "
                f"width per module; search with --format {format} (per-module plans)"
            )
        if widths[0] == 0:
            raise BitsearchError(f"layer '{name}' is pruned (width 0), which {format} cannot store")
        out[name] = widths[0]
    return out


def plan_modules(model: nn.Module, plan, format: str = "compressed-tensors") -> dict[str, nn.Module]:
    """The plan's modules in ``model`` (Linear or PackedLinear), of the plan's shapes (which model
    the plan was made for is ``api.export``'s check)."""
    modules = dict(model.named_modules())
    found = {}
    for name, planned in plan.shapes.items():
        mod = modules.get(name)
        if isinstance(mod, PackedLinear):
            if mod.compact:
                raise BitsearchError(f"layer '{name}' has pruned rows, which {format} cannot store")
            shape = (mod.n_rows, mod.in_features)
        elif isinstance(mod, nn.Linear):
            shape = tuple(mod.weight.shape)
        else:
            kind = type(mod).__name__ if mod is not None else "missing"
            raise BitsearchError(f"layer '{name}' is {kind}: {format} export covers Linear targets only")
        if shape != planned:
            raise BitsearchError(
                f"plan: layer '{name}' is {planned[0]}x{planned[1]} in the plan but {shape[0]}x{shape[1]} in the model"
            )
        found[name] = mod
    return found


def quant_tensors(mod: nn.Module, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Packed codes (R, ceil(K*b/8)) uint8, scales (R, n_groups) float16 and zeros (R, n_groups)
    uint8 of one module at one width, from its packed buffers (learned parameters kept) or from
    the min-max grid."""
    if isinstance(mod, PackedLinear):
        stored = mod.packed_tensors()
        if not bool((stored["qbits"] == bits).all()):
            raise BitsearchError("a packed layer's stored widths differ from the plan's")
        if mod.group_size != group_size:
            raise BitsearchError(f"a packed layer has group size {mod.group_size}, the plan {group_size}")
    else:
        stored = pack_weight(mod.weight, torch.full((mod.out_features,), bits), group_size)
    return {k: stored[f"{k}_b{bits}"].cpu() for k in ("codes", "scales", "zeros")}


def float16_weight(mod: nn.Module) -> torch.Tensor:
    """The weight of a module kept at 16 bits, as the float16 tensor the formats store."""
    w = mod.dequantized_weight() if isinstance(mod, PackedLinear) else mod.weight
    return w.detach().cpu().to(torch.float16).contiguous()


def other_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the weights of the modules in ``skip`` (their biases are
    kept), a tied tensor once (transformers ties it again)."""
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


def write_checkpoint(model: nn.Module, tokenizer, tensors: dict[str, torch.Tensor], qcfg: dict, out: str) -> None:
    """An HF checkpoint folder at ``out`` (written atomically): ``tensors`` in one safetensors
    file, the model's config with ``quantization_config`` = ``qcfg`` and its dtype, the
    generation config and the tokenizer."""
    from safetensors.torch import save_file

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
