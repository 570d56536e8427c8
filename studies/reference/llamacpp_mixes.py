"""llama.cpp's per-tensor quantization mixes (Q2_K ... Q6_K) re-expressed as bitsearch plans: the
rule-based peer of issue 7.

llama.cpp does not search: ``llama_tensor_get_type`` (src/llama-quant.cpp) gives each tensor a
k-quant type by fixed rules on its role and depth. The rules kept here are those that act on a
dense Llama-like model's decoder Linears (``attn_v``, ``attn_output``, ``ffn_down``; q, k,
gate and up keep the mix's base type; the output and embedding tensors are not targets):

* Q2_K: base 2; attn_v 4 if n_gqa >= 4 else 3; attn_output 3; ffn_down 3.
* Q3_K_S: base 3; attn_v 4 if n_gqa >= 4.
* Q3_K_M: base 3; attn_v 5 for the first two layers, else 4; attn_output 4; ffn_down 5 for
  layers below n_layer/16, else 4.
* Q3_K_L: base 3; attn_v, attn_output and ffn_down 5.
* Q4_K_S: base 4; attn_v 5 for the first four layers (else 5 if n_gqa >= 4); ffn_down 5 for
  layers below n_layer/8.
* Q4_K_M: base 4; attn_v and ffn_down 6 where ``use_more_bits`` (the first and last eighth of
  the layers and every third layer in between), else attn_v 5 if n_gqa >= 4.
* Q5_K_M: base 5; attn_v and ffn_down 6 where ``use_more_bits``, else attn_v 6 if n_gqa >= 4.
* Q6_K: 6 everywhere.

The k-quant formats themselves (256-weight super-blocks with 4- to 6-bit sub-block scales) are
replaced by bitsearch's grid (per row and group of G columns: float16 scale, uint8 zero): a
type ``Qn_K`` becomes width n. :func:`rule_mix_plan` builds the per-tensor plan for one mix and
group size; :func:`best_rule_mix` picks, for a byte budget, the (mix, group size) pair that
stores the most bytes without exceeding it, which is how the benchmark puts the rules "at
equal bytes" with the other methods.
"""

from __future__ import annotations

import numpy as np

from bitsearch.cost import row_bytes
from bitsearch.io.plan import BitPlan
from bitsearch.layer_names import layer_types
from bitsearch.models import find_targets, model_fingerprint

__all__ = ["MIXES", "rule_widths", "rule_mix_plan", "per_tensor_bytes", "best_rule_mix"]

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
_BASE = {"Q2_K": 2, "Q3_K_S": 3, "Q3_K_M": 3, "Q3_K_L": 3, "Q4_K_S": 4, "Q4_K_M": 4, "Q5_K_M": 5, "Q6_K": 6}
#: bitsearch/HF layer type -> llama.cpp tensor role
_ROLE = {
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "down_proj": "ffn_down",
    "dense": "attn_output",
    "out_proj": "attn_output",
    "fc2": "ffn_down",
    "dense_4h_to_h": "ffn_down",
}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _width(mix: str, role: str | None, i: int, n: int, n_gqa: int) -> int:
    base = _BASE[mix]
    if role == "attn_v":
        if mix == "Q2_K":
            return 4 if n_gqa >= 4 else 3
        if mix == "Q3_K_M":
            return 5 if i < 2 else 4
        if mix == "Q3_K_L":
            return 5
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return 6
        if mix == "Q4_K_S" and i < 4:
            return 5
        if n_gqa >= 4 and base in (3, 4, 5):
            return base + 1
        return base
    if role == "attn_output":
        return {"Q2_K": 3, "Q3_K_M": 4, "Q3_K_L": 5}.get(mix, base)
    if role == "ffn_down":
        if mix == "Q2_K":
            return 3
        if mix == "Q3_K_M":
            return 5 if i < n // 16 else 4
        if mix == "Q3_K_L":
            return 5
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return 6
        if mix == "Q4_K_S" and i < n // 8:
            return 5
    return base


def rule_widths(model, mix: str) -> dict[str, int]:
    """Width of every target (decoder Linear) of ``model`` under llama.cpp's ``mix``."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r} (choose from {', '.join(MIXES)})")
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    n_gqa = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
    names = [t.name for t in find_targets(model)]
    types = layer_types(names)
    n_layer = 1 + max(b for b, _ in types.values() if b is not None)
    return {name: _width(mix, _ROLE.get(t), b or 0, n_layer, n_gqa) for name, (b, t) in types.items()}


def rule_mix_plan(model, mix: str, group_size: int) -> BitPlan:
    widths = rule_widths(model, mix)
    targets = find_targets(model)
    plan = BitPlan(
        model=model_fingerprint(model, targets),
        group_size=group_size,
        menu=sorted(set(widths.values())),
        bits={t.name: np.full(t.out_features, widths[t.name], dtype=np.uint8) for t in targets},
        provenance={"allocator": f"llama.cpp {mix} rules", "group_size": group_size},
    )
    plan.fill_summary()
    return plan


def per_tensor_bytes(plan: BitPlan) -> int:
    """Bytes of a plan whose rows share one width per tensor: codes, float16 scales and uint8
    zeros (no per-row width map is needed, unlike bitsearch's mixed plans)."""
    total = 0
    for name, (out_f, in_f) in plan.shapes.items():
        widths = np.unique(plan.bits[name])
        if len(widths) != 1:
            raise ValueError(f"{name}: rows of different widths; not a per-tensor plan")
        total += out_f * row_bytes(in_f, int(widths[0]), plan.group_size)
    return total


def best_rule_mix(model, budget_bytes: int, group_sizes=(32, 64, 128, 256, None)) -> tuple[BitPlan, int] | None:
    """The (mix, group size) plan storing the most bytes within ``budget_bytes``, with its bytes;
    None if even the smallest does not fit. Group size None: one group per row."""
    per_row = max(t.in_features for t in find_targets(model))
    group_sizes = [per_row if g is None else g for g in group_sizes]
    best = None
    for mix in MIXES:
        for g in group_sizes:
            plan = rule_mix_plan(model, mix, g)
            n = per_tensor_bytes(plan)
            if n <= budget_bytes and (best is None or n > best[1]):
                best = (plan, n)
    return best
