"""Searched plans vs uniform round-to-nearest on slm-llama-17m: the README's results table.

Runs sensitivity once (imatrix, layer-loss calibrated), then for each budget a greedy plan
(with and without pruning), applies each plan as a packed checkpoint, checks the written bytes
against the plan's bytes, and evaluates perplexity on the first --max-tokens tokens of the eval
text (512-token windows). Uniform RTN at 2, 3 and 4 bits goes through the same path. Saves
``results.csv``, ``results.json`` (with these arguments) and ``ppl_vs_bits.png`` in --out.

    python -m studies.slm_budget_table --out studies/results/slm_budget_table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from bitsearch import api
from bitsearch.config import EvalConfig, SearchConfig, SensitivityConfig
from bitsearch.io.checkpoint import packed_tensor_bytes
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.plots import plot_ppl_vs_bits
from bitsearch.search import build_problem
from bitsearch.sensitivity import SensitivityTable

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"), help="model folder or hub id")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"), help="calibration text")
    ap.add_argument(
        "--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"), help="evaluation text"
    )
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sample length")
    ap.add_argument("--calib-loss-samples", type=int, default=16, help="samples for the per-layer loss response")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group size")
    ap.add_argument("--budgets", default="2.5,3.0,3.25", help="avg-bit budgets for the greedy plans")
    ap.add_argument("--uniform", default="2,3,4", help="uniform RTN widths")
    ap.add_argument("--max-tokens", type=int, default=40000, help="evaluation tokens")
    ap.add_argument("--table", default=None, help="reuse a saved sensitivity table instead of computing one")
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, tok = load_model(args.model, args.device), load_tokenizer(args.model)
    if args.table:
        table = SensitivityTable.load(args.table)
    else:
        config = SensitivityConfig(
            samples=args.samples,
            seq_len=args.seq_len,
            group_size=args.group_size,
            loss_calibration_samples=args.calib_loss_samples,
            device=args.device,
        )
        table = api.sensitivity(
            model, args.calib, config, tokenizer=tok, out=os.path.join(args.out, "sensitivity.parquet"), overwrite=True
        )
    t_sens = time.time() - t0
    print(f"sensitivity: {t_sens:.0f} s", flush=True)
    targets = find_targets(model)
    fp = model_fingerprint(model, targets)

    def ev(m):
        return api.evaluate(
            m,
            args.eval_text,
            EvalConfig(max_tokens=args.max_tokens, seq_len=512, device=args.device, show_progress=False),
            tokenizer=tok,
        )

    float_ppl = ev(model).ppl
    print(f"float ppl {float_ppl:.2f}", flush=True)
    problem = build_problem(table, targets)
    runs = []
    for b in args.budgets.split(","):
        runs.append(("greedy", b, None, "greedy (0 allowed)"))
        runs.append(("greedy", b, 2, "greedy (min 2 bits)"))
    for w in args.uniform.split(","):
        k = problem.bits.index(int(w))
        runs.append(("uniform", f"{problem.bytes_of(np.full(problem.n_channels, k))}B", None, f"uniform RTN W{w}"))
    rows = []
    for method, budget, min_bits, label in runs:
        plan = api.search_plan(table, targets, fp, SearchConfig(budget=budget, method=method, min_bits=min_bits))
        with tempfile.TemporaryDirectory() as tmp:
            api.apply(copy.deepcopy(model), plan, out=os.path.join(tmp, "packed"))  # packs the copy in place
            written = packed_tensor_bytes(os.path.join(tmp, "packed"))
            packed = load_model(os.path.join(tmp, "packed"), args.device)
            ppl = ev(packed).ppl
        row = {
            "label": label,
            "method": "greedy" if method == "greedy" else "uniform",
            "budget": budget,
            "avg_bits": plan.summary["avg_bits"],
            "plan_bytes": plan.summary["bytes"],
            "written_bytes": written,
            "bytes_match": written == plan.summary["bytes"],
            "pruned_channels": plan.summary["pruned_channels"],
            "histogram": json.dumps(plan.summary["histogram"]),
            "predicted_loss_increase": plan.summary["predicted_error"],
            "ppl": ppl,
        }
        rows.append(row)
        print(
            f"{label:22s} budget {budget:>10s}: {row['avg_bits']:.4f} bits, pruned {row['pruned_channels']}, "
            f"bytes match {row['bytes_match']}, ppl {ppl:.2f}",
            flush=True,
        )
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(args.out, "results.csv"), index=False)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "float_ppl": float_ppl,
                "sensitivity_seconds": t_sens,
                "total_seconds": time.time() - t0,
                "rows": rows,
            },
            f,
            indent=1,
        )
    plot_df = df.assign(method=df["label"].where(df["method"] == "greedy", "uniform"))
    plot_ppl_vs_bits(
        plot_df,
        os.path.join(args.out, "ppl_vs_bits.png"),
        float_ppl=float_ppl,
        title=f"{os.path.basename(args.model.rstrip('/'))}: {args.max_tokens} tokens of eval text",
    )
    print(df.drop(columns=["histogram"]).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
