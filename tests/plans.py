"""Plans for the tiny test models, shared by the finalizer tests."""

from __future__ import annotations

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
