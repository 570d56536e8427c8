"""A greedy plan on curves rescaled by how much of each layer type's rounding error a finalizer
removes (an experiment; README, "After finalization").

The estimator's curves predict round-to-nearest's loss increase. A finalizer removes part of the
rounding error, and not the same part everywhere: ``finalizer_repair.py`` measured on
slm-llama-17m that SignRound leaves 50 % of o_proj's 2-bit output error but 74 % of q_proj's,
and 77-108 % at 3 bits. This script multiplies every channel's error at width b by the ratio
measured for its layer type at b (widths not measured for a type take the ratio of the nearest
measured width of that type), runs the greedy allocator on the rescaled curves and saves the plan.
The ratios must come from calibration text (``finalizer_repair.py --calib-text``), never from the
evaluation text. Measured at 2.5 bits with SignRound's ratios, the plan was no better than
greedy's after SignRound (same wikitext2 KL, higher perplexity; README).

    python -m studies.finalizer_aware --table studies/results/estimator_study/sensitivity.parquet \\
        --repair studies/results/finalizer_repair-greedy-calib/finalizer_repair.json --label signround \\
        --budget 2.5 --out studies/results/finalizer_aware/greedy-signround-aware_2.5.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from bitsearch.api import invoked_as, search_plan
from bitsearch.config import SearchConfig
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.search import Allocator, get_allocator
from bitsearch.sensitivity import SensitivityTable

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def repair_ratios(rows: list[dict], label: str) -> dict[str, dict[int, float]]:
    """{layer type: {width: the finalizer's error / round-to-nearest's}} from finalizer_repair rows."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["layer type"], {})[int(r["width"])] = float(r[f"{label} / rtn"])
    return out


def ratio_at(ratios: dict[int, float], width: int) -> float:
    """The ratio at ``width``, or at the nearest measured width (the lower one on a tie)."""
    nearest = min(ratios, key=lambda w: (abs(w - width), w))
    return ratios[nearest]


def rescale(problem, ratios: dict[str, dict[int, float]]) -> None:
    """Multiply, in place, each layer's curves at width b by its layer type's ratio at b."""
    for name, rows in problem.layer_slices.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in ratios:
            continue
        scale = np.array([ratio_at(ratios[kind], b) for b in problem.bits])
        problem.errors[rows] = problem.errors[rows] * scale


class FinalizerAwareGreedy(Allocator):
    """The greedy allocator on curves first rescaled by ``ratios`` (:func:`rescale`)."""

    name = "greedy"

    def __init__(self, ratios: dict[str, dict[int, float]]):
        self.ratios = ratios
        self.greedy = get_allocator("greedy")

    def allocate(self, problem, budget_bytes: int) -> np.ndarray:
        rescale(problem, self.ratios)
        return self.greedy.allocate(problem, budget_bytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--table", required=True)
    ap.add_argument("--repair", required=True, help="finalizer_repair.json measured on calibration text")
    ap.add_argument("--label", default="signround", help="which checkpoint's ratios (its --packed label)")
    ap.add_argument("--budget", default="2.5")
    ap.add_argument("--mix", default="imatrix")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = json.load(open(args.repair))["rows"]
    if not rows or f"{args.label} / rtn" not in rows[0]:
        sys.exit(f"finalizer_aware: '{args.repair}' has no ratios labelled '{args.label}'")
    ratios = repair_ratios(rows, args.label)
    model = load_model(args.model, "cpu", "float32")
    targets = find_targets(model)
    table = SensitivityTable.load(args.table)
    config = SearchConfig(budget=args.budget, method="greedy", min_bits=2, mix=args.mix)
    with invoked_as(" ".join(["python -m studies.finalizer_aware"] + sys.argv[1:])):
        plan = search_plan(
            table,
            targets,
            model_fingerprint(model, targets),
            config,
            allocator=FinalizerAwareGreedy(ratios),
            provenance={"model_name": args.model, "finalizer_aware": {"label": args.label, "repair": args.repair}},
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plan.save(args.out)
    print(f"{args.out}: {plan.n_bytes()} bytes, {8 * plan.n_bytes() / sum(t.numel for t in targets):.4f} bits")
    return plan


if __name__ == "__main__":
    main()
