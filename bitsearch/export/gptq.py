"""GPTQ export: a per-module plan as an HF checkpoint in the GPTQ format (``quant_method`` "gptq").

Per quantized Linear with N outputs, K inputs, width b in {2, 3, 4, 8} and group size G (n_g =
K / G groups, one for G = -1), the tensors GPTQ kernels read (``desc_act`` false, so the groups
are consecutive inputs):

    qweight  int32 (ceil(K*b/32), N)   codes, packed along K
    qzeros   int32 (n_g, ceil(N*b/32)) zero points, packed along N
    scales   float16 (n_g, N)
    g_idx    int32 (K,)                group of each input: k // G

Packing: the b-bit values along the packed axis form one little-endian bit stream (value j at
bits j*b .. j*b+b-1, crossing 32-bit words for b = 3), the same stream as bitsearch's own
(``quant/packing.py``) padded to whole words: a row of bitsearch's packed codes is a column of
``qweight``. The weight is W[k, n] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k]: that
is bitsearch's grid, (q - z) * scale with q, z in [0, 2^b - 1], transposed.

Zero points: ``checkpoint_format`` "gptq_v2" stores z itself. (v1, "gptq", stores z - 1 and the
reader adds 1 to every packed word, which carries into the next field when z = 0; gptqmodel's
loader refuses asymmetric v1 files that another tool wrote.) The grid is asymmetric (``sym``
false).

One global scheme (``bits``, ``group_size``) covers the quantized modules; modules at another
width are overridden in ``dynamic`` (``+:^name$`` → ``{"bits": b}``, exact names, the first
matching key wins), and Linear modules of the decoder blocks that stay dense (planned at 16 bits,
or not targets) are excluded twice: ``-:^name$`` in ``dynamic`` and left out of
``modules_in_block_to_quantize``. transformers (5.25, with optimum and gptqmodel) reads
``modules_in_block_to_quantize`` but not ``dynamic``: it loads a plan whose quantized modules
share one width; gptqmodel's own loader and other runtimes that read ``dynamic`` load any plan.
Modules outside the decoder blocks (``lm_head``) stay dense: GPTQ quantizes only the blocks.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from ..errors import BitsearchError
from ..models import decoder_blocks
from ..packed import PackedLinear
from ..quant.grid import KEEP_WIDTH, n_groups
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

__all__ = ["GptqExporter", "module_bytes", "quantization_config", "WIDTHS"]

FORMAT = "gptq"
#: the widths transformers' GPTQConfig accepts
WIDTHS = (2, 3, 4, 8)
#: the group sizes gptqmodel's kernels take
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
_WORD = 4


def module_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes the format stores for one Linear at one width (qweight, qzeros, scales, g_idx)."""
    if bits == KEEP_WIDTH:
        return 2 * out_features * in_features
    if bits not in WIDTHS:
        raise BitsearchError(f"gptq stores widths {', '.join(map(str, WIDTHS))} and 16, not {bits}")
    ng = n_groups(in_features, group_size)
    return (
        _WORD * out_features * int32_words(in_features, bits)
        + _WORD * ng * int32_words(out_features, bits)
        + 2 * ng * out_features
        + _WORD * in_features
    )


def _check_module(name: str, out_features: int, in_features: int, group_size: int) -> None:
    if out_features % 32 or in_features % 32:
        raise BitsearchError(f"layer '{name}' is {out_features}x{in_features}: gptq export needs multiples of 32")
    if group_size != -1 and group_size < in_features and in_features % group_size:
        raise BitsearchError(f"layer '{name}' has {in_features} inputs, not a multiple of the group size {group_size}")


def _block_linears(model: nn.Module, prefix: str) -> list[str]:
    """Names of the modules transformers' GPTQ loader would replace: plain Linear in the blocks."""
    return [
        n
        for n, m in model.named_modules()
        if n.startswith(prefix + ".") and (type(m) is nn.Linear or isinstance(m, PackedLinear))
    ]


def _key(name: str) -> str:
    return "^" + re.escape(name) + "$"


def quantization_config(widths: dict[str, int], block_linears: list[str], group_size: int) -> dict:
    """The ``quantization_config`` of config.json: the most common width as ``bits``, the other
    widths and the dense modules in ``dynamic``, the quantized modules in
    ``modules_in_block_to_quantize`` when some block Linear stays dense."""
    quantized = {n: b for n, b in widths.items() if b != KEEP_WIDTH}
    if not quantized:
        raise BitsearchError("the plan keeps every module at 16 bits: there is nothing for gptq to store")
    base = min(Counter(quantized.values()).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    dynamic: dict[str, dict] = {f"+:{_key(n)}": {"bits": b} for n, b in quantized.items() if b != base}
    dense = [n for n in block_linears if n not in quantized]
    dynamic.update({f"-:{_key(n)}": {} for n in dense})
    from .. import __version__

    qcfg = {
        "quant_method": "gptq",
        "bits": base,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq_v2",
        "meta": {"quantizer": [f"bitsearch:{__version__}"]},
    }
    if dynamic:
        qcfg["dynamic"] = dynamic
    if dense:
        qcfg["modules_in_block_to_quantize"] = [[n for n in block_linears if n in quantized]]
    return qcfg


def _tensors(name: str, mod: nn.Module, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """The format's four tensors of one module."""
    t = quant_tensors(mod, bits, group_size)
    in_features = mod.in_features
    g = in_features if group_size == -1 or group_size >= in_features else group_size
    return {
        f"{name}.qweight": pack_int32(t["codes"]).t().contiguous(),
        f"{name}.qzeros": pack_int32(pack_codes(t["zeros"].t().contiguous(), bits)),
        f"{name}.scales": t["scales"].t().to(torch.float16).contiguous(),
        f"{name}.g_idx": torch.arange(in_features, dtype=torch.int32) // g,
    }


@register_exporter
class GptqExporter(Exporter):
    name = FORMAT
    description = "HF checkpoint in the GPTQ format (transformers with optimum + gptqmodel); per-module plans"
    plan_unit = "module"
    widths = WIDTHS + (KEEP_WIDTH,)

    def module_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        return module_bytes(out_features, in_features, bits, group_size)

    def export(self, model: nn.Module, tokenizer, plan, out: str) -> dict:
        if plan.group_size not in GROUP_SIZES:
            raise BitsearchError(
                f"gptq kernels take group sizes {', '.join(map(str, GROUP_SIZES))}, not {plan.group_size}"
            )
        widths = module_widths(plan, FORMAT)
        bad = sorted({b for b in widths.values() if b not in self.widths})
        if bad:
            raise BitsearchError(f"gptq stores widths {', '.join(map(str, WIDTHS))} and 16, not {bad}")
        modules = plan_modules(model, plan, FORMAT)
        prefix = decoder_blocks(model)[0]
        for name, b in widths.items():
            if b == KEEP_WIDTH:
                continue
            if not name.startswith(prefix + "."):
                raise BitsearchError(
                    f"layer '{name}' lies outside the decoder blocks ({prefix}), which gptq leaves dense: "
                    f"plan it at 16 bits or leave it out of the targets"
                )
            _check_module(name, *plan.shapes[name], plan.group_size)
        qcfg = quantization_config(widths, _block_linears(model, prefix), plan.group_size)
        tensors, quant_bytes = {}, 0
        for name, mod in modules.items():
            if widths[name] == KEEP_WIDTH:
                part = {f"{name}.weight": float16_weight(mod)}
            else:
                part = _tensors(name, mod, widths[name], plan.group_size)
            quant_bytes += sum(t.numel() * t.element_size() for t in part.values())
            tensors.update(part)
        tensors.update(other_tensors(model, set(modules)))
        write_checkpoint(model, tokenizer, tensors, qcfg, out)
        predicted = sum(module_bytes(*plan.shapes[n], widths[n], plan.group_size) for n in widths)
        quantized = {b for b in widths.values() if b != KEEP_WIDTH}
        return {
            "out": out,
            "target_bytes": quant_bytes,
            "predicted_target_bytes": predicted,
            "bits": qcfg["bits"],
            "dynamic": len(qcfg.get("dynamic", {})),
            # transformers reads no `dynamic`: it loads one width for every quantized module
            "transformers_loadable": len(quantized) == 1,
        }
