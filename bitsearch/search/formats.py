"""Per-module search for a runtime format: one width per module, fused modules tied, priced in the
format's own bytes.

Runtimes that store one scheme per module (compressed-tensors, GPTQ) fuse q/k/v and gate/up
into one matrix, so those modules must share a scheme. A search for such a format is the exact
``ilp`` allocator at ``granularity="layer"`` with ``share`` patterns for the fused sets, on a
problem whose costs are the format's bytes (``Exporter.module_bytes``) instead of bitsearch's
packed ones: each module's whole price sits on its first row (the other rows cost 0), so the
price of a module-wide unit is exact, and there is no per-row bit map.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BitsearchError
from .problem import AllocationProblem

__all__ = ["FUSED_SHARE", "format_problem", "format_bytes", "module_search_options"]

#: module sets a serving runtime fuses into one matrix (Llama, Qwen2, Mistral names)
FUSED_SHARE = [r"^(.*)\.self_attn\.[qkv]_proj$", r"^(.*)\.mlp\.(?:gate|up)_proj$"]


def _exporter(format: str):
    from ..export import get_exporter

    exp = get_exporter(format)
    if exp.plan_unit != "module":
        raise BitsearchError(f"format '{format}' stores per-channel plans: search it without --format")
    return exp


def module_search_options(fused: bool = True, share: list[str] | None = None) -> dict:
    """The ``ilp`` options of a per-module search: ``share`` patterns, else the fused sets when ``fused``."""
    return {"granularity": "layer", "share": list(share) if share else (list(FUSED_SHARE) if fused else None)}


def format_problem(problem: AllocationProblem, shapes: dict[str, tuple[int, int]], format: str) -> AllocationProblem:
    """``problem`` with its costs in ``format``'s bytes (widths it cannot store removed)."""
    exp = _exporter(format)
    menu = [b for b in problem.bits if b != 0 and (exp.widths is None or b in exp.widths)]
    if not menu:
        stored = "pruned modules" if exp.widths is None else f"widths {sorted(set(problem.bits) - {0})}"
        raise BitsearchError(f"format '{format}' cannot store {stored} and the menu has no other width")
    cols = [problem.bits.index(b) for b in menu]
    costs = np.zeros((problem.n_channels, len(menu)), dtype=np.int64)
    for name, s in problem.layer_slices.items():
        out_f, in_f = shapes[name]
        costs[s.start] = [exp.module_bytes(out_f, in_f, b, problem.group_size) for b in menu]
    return dataclasses.replace(problem, bits=menu, errors=problem.errors[:, cols], costs=costs, fixed_bytes=0)


def format_bytes(plan, format: str) -> int:
    """Bytes ``format`` stores for a per-module plan's targets."""
    from ..export.hf_checkpoint import module_widths

    exp = _exporter(format)
    widths = module_widths(plan, format)
    return sum(exp.module_bytes(*plan.shapes[n], b, plan.group_size) for n, b in widths.items())
