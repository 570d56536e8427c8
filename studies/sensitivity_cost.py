"""What the default sensitivity pass costs, as a ratio to one forward+backward, and how it grows.

1. ``--part slm``: on slm-llama-17m with its calibration text, for each sample count (default
   128 and 32 samples of 512 tokens): one forward+backward over the calibration tokens (the
   unit: mean next-token cross-entropy, every parameter trainable, micro-batches of 8, after a
   warm-up; ``scale.py``'s definition), then the default ``compute_sensitivity`` (imatrix,
   ``--calibrate auto``) with each stage's time as recorded in the table's ``stage_seconds``,
   then the greedy allocation at 2.5 bits, then the unit again. Ratios divide by the mean of the
   two units (both are saved: on a shared machine the speed drifts). ``--calibrations`` adds
   other calibrations to compare (``layer-loss``: the exact per-layer measurement).
2. ``--part depth``: the same ratios on random-initialised Llama models of the 1B shape
   (``scale.py``'s ``1b``; ``--depth-shape``) at 2, 4, 8 and 16 blocks, random token ids, a
   reduced token count.
3. ``--part overheads``: wall time of ``python -m bitsearch --help`` (a fresh interpreter) and of
   the greedy allocation on a random 518,144-channel problem (menu 2..8), beside the same
   allocation with the fill that visits every remaining segment (the tests' reference).

    OMP_NUM_THREADS=1 nice -n 10 python -m studies.sensitivity_cost --threads 1 --part slm \\
        --out studies/results/sensitivity_cost
    OMP_NUM_THREADS=1 nice -n 10 python -m studies.sensitivity_cost --threads 1 --part depth \\
        --out studies/results/sensitivity_cost
    OMP_NUM_THREADS=1 nice -n 10 python -m studies.sensitivity_cost --threads 1 --part overheads \\
        --out studies/results/sensitivity_cost

Each part writes ``<part>.json`` and ``<part>.md`` (a markdown table; depth: ``depth-<shape>``) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bitsearch.cost import budget_to_bytes
from bitsearch.data import calibration_batches
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets
from bitsearch.search import build_problem, get_allocator
from bitsearch.search.problem import AllocationProblem
from bitsearch.sensitivity import compute_sensitivity
from studies.reference.greedy_walk import fill_walking_every_segment
from studies.scale import Meter, build_config, build_model, fwd_bwd

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")


def measure(model, batch: torch.Tensor, calibrate: str, micro_batch: int, budget: float) -> dict:
    """Unit, default sensitivity (per stage), greedy allocation, unit again: seconds and ratios."""
    meter = Meter(torch.device("cpu"))
    unit_before, _ = fwd_bwd(model, batch, micro_batch, meter)
    targets = find_targets(model)
    t0 = time.perf_counter()
    table = compute_sensitivity(
        model, targets, batch, estimators="imatrix", calibrate=calibrate, micro_batch=micro_batch, show_progress=False
    )
    sens = time.perf_counter() - t0
    t0 = time.perf_counter()
    problem = build_problem(table, targets, min_bits=2)
    get_allocator("greedy").allocate(problem, budget_to_bytes(budget, problem.n_weights))
    alloc = time.perf_counter() - t0
    unit_after, _ = fwd_bwd(model, batch, micro_batch, meter)
    unit = (unit_before + unit_after) / 2
    stages = dict(table.meta["stage_seconds"])
    stages["other (table assembly)"] = max(0.0, table.meta["seconds"] - sum(stages.values()))
    return {
        "samples": batch.shape[0],
        "seq_len": batch.shape[1],
        "calibrate": calibrate,
        "calibration_method": table.meta["calibration_method"],
        "unit_seconds_before": unit_before,
        "unit_seconds_after": unit_after,
        "sensitivity_seconds": sens,
        "allocation_seconds": alloc,
        "stage_seconds": stages,
        "sensitivity_ratio": sens / unit,
        "stage_ratios": {k: v / unit for k, v in stages.items()},
        "allocation_ratio": alloc / unit,
    }


def markdown(rows: list[dict], first: str) -> str:
    stages = list(dict.fromkeys(k for r in rows for k in r["stage_ratios"]))
    head = (
        [first, "calibrate", "unit s (before, after)", "sensitivity × unit"]
        + [f"{s} ×" for s in stages]
        + ["allocation ×"]
    )
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [
            str(r[first]),
            r["calibrate"],
            f"{r['unit_seconds_before']:.1f}, {r['unit_seconds_after']:.1f}",
            f"**{r['sensitivity_ratio']:.2f}**",
        ]
        cells += [f"{r['stage_ratios'][s]:.3f}" if s in r["stage_ratios"] else "" for s in stages]
        cells.append(f"{r['allocation_ratio']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(out: str, part: str, args, rows: list[dict], table: str) -> None:
    with open(os.path.join(out, f"{part}.json"), "w") as f:
        json.dump({"args": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    with open(os.path.join(out, f"{part}.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)


def part_slm(args) -> None:
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    rows = []
    for samples in [int(s) for s in args.samples.split(",")]:
        batch, _ = calibration_batches(tok, args.calib, samples, args.seq_len, 0)
        for calibrate in args.calibrations.split(","):
            rows.append(measure(model, batch, calibrate, args.micro_batch, args.budget))
            print(json.dumps(rows[-1]), flush=True)
            save(args.out, "slm", args, rows, markdown(rows, "samples"))


def part_depth(args) -> None:
    rows = []
    g = torch.Generator().manual_seed(0)
    for layers in [int(n) for n in args.depths.split(",")]:
        cfg = build_config(args.depth_shape, layers)
        model = build_model(cfg, torch.device("cpu"), torch.float32)
        batch = torch.randint(0, cfg.vocab_size, (args.depth_samples, args.depth_seq_len), generator=g)
        row = measure(model, batch, "auto", args.micro_batch, args.budget)
        row["layers"] = layers
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args.out, f"depth-{args.depth_shape}", args, rows, markdown(rows, "layers"))
        del model


def part_overheads(args) -> None:
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    helps = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bitsearch", "--help"], env=env, cwd="/", check=True, stdout=subprocess.DEVNULL
        )
        helps.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    n, bits = 518_144, [2, 3, 4, 5, 6, 8]
    ins = rng.choice([2048, 8192], size=n)
    costs = np.array([[k * b // 8 + 4 * (k // 128) for b in bits] for k in (2048, 8192)], dtype=np.int64)
    costs = costs[(ins == 8192).astype(int)]
    errors = (
        rng.lognormal(0, 2, size=(n, 1))
        * 4.0 ** -np.asarray(bits, dtype=float)[None, :]
        * rng.uniform(0.8, 1.2, size=(n, len(bits)))
    )
    p = AllocationProblem(
        bits=bits,
        errors=errors,
        costs=costs,
        fixed_bytes=n // 8,
        n_weights=int(ins.sum()),
        layer_slices={"all": slice(0, n)},
        group_size=128,
    )

    greedy = get_allocator("greedy")
    secs, walk = [], []
    for budget in (2.5, 3.25):
        t0 = time.perf_counter()
        a = greedy.allocate(p, int(budget * p.n_weights / 8))
        secs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = fill_walking_every_segment(p, int(budget * p.n_weights / 8))
        walk.append(time.perf_counter() - t0)
        assert np.array_equal(a, b)
    rows = [
        {
            "help_seconds": helps,
            "greedy_seconds_2.5_3.25": secs,
            "full_walk_seconds_2.5_3.25": walk,
            "greedy_channels": n,
        }
    ]
    table = "\n".join(
        [
            "| measure | seconds |",
            "| --- | ---: |",
            f"| `python -m bitsearch --help` (fastest of 3) | {min(helps):.2f} |",
        ]
        + [
            f"| greedy allocation, {n:,} channels, {b} bits (filling by visiting every remaining "
            f"segment: {w:.2f} s, same plan) | {s:.2f} |"
            for b, s, w in zip((2.5, 3.25), secs, walk)
        ]
    )
    save(args.out, "overheads", args, rows, table)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=["slm", "depth", "overheads"])
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--samples", default="128,32", help="sample counts of --part slm")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibrations", default="auto", help="--calibrate values to measure (comma-separated)")
    ap.add_argument("--depths", default="2,4,8,16", help="decoder blocks of the models of --part depth")
    ap.add_argument("--depth-shape", default="1b", help="scale.py's shape of those models (1b, small, ...)")
    ap.add_argument("--depth-samples", type=int, default=8)
    ap.add_argument("--depth-seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    {"slm": part_slm, "depth": part_depth, "overheads": part_overheads}[args.part](args)


if __name__ == "__main__":
    main()
