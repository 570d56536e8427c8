"""Search methods compared on slm-llama-17m: greedy vs optuna vs diffq from the same estimator.

Uses a saved sensitivity table (default: the estimator study's merged table, which is not
committed: run ``python -m studies.estimator_study`` first, or pass ``--table``), the calibration
text for the model-in-the-loop methods, and evaluates every plan by fake quantization on the
first --max-tokens tokens of the evaluation text (512-token windows). Saves ``results.csv`` and
``results.json`` in --out; each optuna study's journal lies next to its plan.

    python -m studies.search_methods_study --out studies/results/search_methods
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pandas as pd
import torch

from bitsearch import api
from bitsearch.config import EvalConfig, SearchConfig
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.quantize import fake_quantize_model

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--table", default=os.path.join(HERE, "results", "estimator_study", "sensitivity.parquet"))
    ap.add_argument("--mix", default="imatrix", help="estimator whose curves every method starts from")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--budgets", default="2.25,2.5")
    ap.add_argument("--methods", default="greedy,optuna,diffq")
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--sampler", default="nsga2", help="optuna sampler: nsga2 | tpe")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="optuna: keep the journals and finish their studies to --n-trials (then choose again)",
    )
    ap.add_argument(
        "--span",
        type=float,
        default=0.25,
        help="optuna: trials also try budgets down to budget - span (0: every trial at the budget)",
    )
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kl-samples", type=int, default=48)
    ap.add_argument("--learn", default="channel", help="diffq: widths trained per 'channel' or per 'layer'")
    ap.add_argument("--relax", default="rtn", help="diffq: training forward with interpolated 'rtn' or 'noise'")
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for budget in args.budgets.split(","):
        for method in args.methods.split(","):
            out = os.path.join(args.out, f"{method}_{budget}.json")
            for f in (out, os.path.splitext(out)[0] + ".optuna.journal"):
                if os.path.exists(f) and not (args.resume and f.endswith(".journal")):
                    os.remove(f)
            t0 = time.time()
            config = SearchConfig(
                budget=budget,
                method=method,
                mix=args.mix,
                n_trials=args.n_trials,
                sampler=args.sampler,
                span=args.span,
                resume=args.resume,
                steps=args.steps,
                kl_samples=args.kl_samples,
                show_progress=False,
                **({"learn": args.learn, "relax": args.relax} if method == "diffq" else {}),
            )
            plan = api.search(model, args.calib, config, tokenizer=tok, table=args.table, out=out)
            secs = time.time() - t0
            model.load_state_dict(state)
            fake_quantize_model(model, plan)
            ppl = api.evaluate(
                model,
                args.eval_text,
                EvalConfig(max_tokens=args.max_tokens, seq_len=512, show_progress=False),
                tokenizer=tok,
            ).ppl
            model.load_state_dict(state)
            rows.append(
                {
                    "method": method,
                    "budget": float(budget),
                    "avg_bits": plan.summary["avg_bits"],
                    "bytes": plan.summary["bytes"],
                    "ppl": ppl,
                    "search_seconds": round(secs, 1),
                    "calibration_kl": plan.provenance.get("calibration_kl"),
                    "validation_kl": plan.provenance.get("validation_kl"),
                    "trial": plan.provenance.get("trial"),
                    "diffq_chosen_step": plan.provenance.get("chosen_step"),
                }
            )
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(args.out, "results.csv"), index=False)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
