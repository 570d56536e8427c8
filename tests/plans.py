"""Plans for the tiny test models, shared by the finalizer and export tests."""

from __future__ import annotations

import os

import numpy as np

from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets, model_fingerprint

MIXED_WIDTHS = [0, 2, 3, 4, 16]


def mixed_plan(model, targets_re: str | None = None, seed: int = 0, gs: int = 32) -> BitPlan:
    """Every width of MIXED_WIDTHS in every layer (the first rows), the rest drawn at random."""
    targets = find_targets(model, targets=targets_re)
    rng = np.random.default_rng(seed)
    bits = {}
    for t in targets:
        b = rng.choice(MIXED_WIDTHS, p=[0.1, 0.3, 0.3, 0.2, 0.1], size=t.out_features).astype(np.uint8)
        b[: len(MIXED_WIDTHS)] = MIXED_WIDTHS
        bits[t.name] = b
    plan = BitPlan(model=model_fingerprint(model, targets), group_size=gs, menu=MIXED_WIDTHS, bits=bits)
    plan.fill_summary()
    return plan


def module_plan(model, widths, gs: int = 32, targets: str | None = None, exclude: str | None = None) -> BitPlan:
    """One width per target, cycling through ``widths`` in module order (a per-module plan)."""
    found = find_targets(model, targets, exclude)
    bits = {t.name: np.full(t.out_features, widths[i % len(widths)], np.uint8) for i, t in enumerate(found)}
    plan = BitPlan(model=model_fingerprint(model, found), group_size=gs, menu=sorted(set(widths)), bits=bits)
    plan.fill_summary()
    return plan


def target_bytes(out: str, plan: BitPlan) -> int:
    """Bytes of the plan's targets in an export's model.safetensors (their biases left out, as
    bitsearch's cost leaves them out)."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            module, leaf = k.rsplit(".", 1)
            if module in plan.bits and leaf != "bias":
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    return total
