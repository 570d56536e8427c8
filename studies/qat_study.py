"""Finalizers compared on slm-llama-17m: round-to-nearest, SignRound, QAT with plain STE,
STE + SoftClamp, Sigmoid STE, both (the paper's comparison), a temperature sweep, e2e vs tiled,
calibration text vs data-free.

Every run starts from the same float model, plan, training samples, steps and learning rate;
the finalized packed model is evaluated on the first --max-tokens tokens of wikitext2_test
(512-token windows). Plans: uniform 4 bits, uniform 3 bits (g128, every row one width) and the
mixed plan at 2.5 avg bits (greedy on the estimator study's imatrix curves; --mixed-plan).

    python -m studies.qat_study --out studies/results/qat --device cuda             # the full study (GPU)
    python -m studies.qat_study --out studies/results/qat_cpu --quick --threads 2   # a CPU subset

Writes results.csv, results.json and qat.png in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pandas as pd
import torch

from bitsearch import api
from bitsearch.config import EvalConfig, FinalizeConfig
from bitsearch.data import calibration_batches
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.plots import plot_runs
from bitsearch.quantize import fake_quantize_model
from bitsearch.search.uniform import uniform_plan

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> finalize keywords (the paper's four, then the others)
SURROGATES = {
    "STE": dict(round_mode="ste", clamp_mode="hard"),
    "STE+SoftClamp": dict(round_mode="ste", clamp_mode="soft"),
    "SigmoidSTE": dict(round_mode="sigmoid", clamp_mode="hard"),
    "SigmoidSTE+SoftClamp": dict(round_mode="sigmoid", clamp_mode="soft"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--mixed-plan", default=os.path.join(HERE, "results", "search_methods", "greedy_2.5.json"))
    ap.add_argument("--plans", default="w4,w3,mixed2.5")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--temperatures", default="0,5,10,20,50,100")
    ap.add_argument("--sigmoid-temperature", type=float, default=20.0, help="T of the paper-comparison runs")
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU subset: the mixed plan only; the four surrogates, SignRound, tiled, data-free; no T sweep",
    )
    ap.add_argument("--only", default=None, help="comma-separated run names to do (e.g. 'RTN,QAT tiled'); default: all")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tok = load_tokenizer(args.model)
    batch, _ = calibration_batches(tok, args.calib, args.samples, args.seq_len, 0)
    fresh = lambda: load_model(args.model, args.device)  # noqa: E731
    plans = {
        "w4": uniform_plan(fresh(), 4, 128),
        "w3": uniform_plan(fresh(), 3, 128),
        "mixed2.5": BitPlan.load(args.mixed_plan),
    }
    wanted = ["mixed2.5"] if args.quick else args.plans.split(",")
    common = dict(
        init="rtn",
        trainable="all",
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        show_progress=False,
    )
    rows = []

    def evaluate(model) -> float:
        return api.evaluate(
            model,
            args.eval_text,
            EvalConfig(max_tokens=args.max_tokens, seq_len=512, device=args.device, show_progress=False),
            tokenizer=tok,
        ).ppl

    def record(plan_name, run, ppl, seconds, **extra):
        rows.append(
            {
                "plan": plan_name,
                "run": run,
                "avg_bits": plans[plan_name].summary["avg_bits"],
                "ppl": ppl,
                "seconds": round(seconds, 1),
                **extra,
            }
        )
        print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(os.path.join(args.out, "results.csv"), index=False)

    only = set(args.only.split(",")) if args.only else None

    def finalize(plan_name, run, data=None, **kw):
        if only is not None and run not in only:
            return
        m = fresh()
        t0 = time.time()
        config = FinalizeConfig(samples=args.samples, data_free=data, device=args.device, **dict(common, **kw))
        api.finalize(
            m,
            plans[plan_name],
            batch if data is None else None,
            config,
            tokenizer=tok,
            out=os.path.join(args.out, "tmp-model"),
            overwrite=True,
        )
        qat = m.bitsearch_plan.provenance["finalize"].get("qat") or {}
        record(
            plan_name,
            run,
            evaluate(m),
            time.time() - t0,
            **{f"last_loss_{k}": v for k, v in (qat.get("last_loss") or {}).items()},
        )

    for name in wanted:
        t0 = time.time()
        if only is None or "RTN" in only:
            record(name, "RTN", evaluate(fake_quantize_model(fresh(), plans[name])), time.time() - t0)
        finalize(name, "SignRound", method="signround", signround_steps=args.steps)
        for label, kw in SURROGATES.items():
            temp = args.sigmoid_temperature if kw["round_mode"] == "sigmoid" else 0.0
            finalize(name, f"QAT {label}", mode="e2e", temperature=temp, **kw)
        if not args.quick:
            for t in [float(x) for x in args.temperatures.split(",")]:
                finalize(name, f"QAT SigmoidSTE T={t:g}", mode="e2e", round_mode="sigmoid", temperature=t)
        finalize(name, "QAT tiled", mode="tiled")
        finalize(name, "QAT tiled+e2e", mode="tiled+e2e")
        finalize(name, "QAT SignRound-init", mode="e2e", init="signround", signround_steps=args.steps)
        finalize(name, "QAT tiled SignRound-init", mode="tiled", init="signround", signround_steps=args.steps)
        finalize(name, "QAT data-free", mode="e2e", data=args.samples)
        finalize(name, "QAT tiled data-free", mode="tiled", data=args.samples)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1)
    plot_runs(
        rows,
        os.path.join(args.out, "qat.png"),
        baseline="RTN",
        color_of=lambda run: "tab:orange" if "Sigmoid" in run or "Soft" in run else "tab:blue",
        xlabel=f"perplexity, {os.path.splitext(os.path.basename(args.eval_text))[0]} (lower is better)",
    )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
