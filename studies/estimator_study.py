"""Estimators compared: plans from imatrix, snr, fisher, hutchinson and their mix on slm-llama-17m.

For each estimator alone: its sensitivity table (timed, as a ratio to one forward+backward pass
over the same calibration tokens, measured in the same run), then greedy plans at each budget,
applied by fake quantization (bit-identical to the packed model, tested) and evaluated on the
first --max-tokens tokens of the evaluation text (512-token windows). Also: the equal-weight mix
of all estimators (greedy), the ``snr`` water-filling allocator on the snr curves, and uniform
round-to-nearest. Saves ``results.csv``, ``timing.csv``, ``results.json``, the merged table
``sensitivity.parquet``, ``ppl_vs_bits.png`` and ``sensitivity.png`` in --out.

    python -m studies.estimator_study --out studies/results/estimator_study

``--shape llama-3.2-1b --timing-only --device cuda`` times the estimators on a random-initialised
model of that shape instead (speed depends on shape, not trained weights) and records peak GPU
memory of the block-by-block pass with and without ``--offload``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bitsearch import api
from bitsearch.config import EvalConfig, SearchConfig
from bitsearch.data import calibration_batches
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.plots import plot_ppl_vs_bits, plot_sensitivity
from bitsearch.quantize import fake_quantize_model
from bitsearch.sensitivity import SensitivityTable, compute_sensitivity

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
SHAPES = {  # random-init shapes for timing (weights do not change speed)
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        head_dim=64,
        max_position_embeddings=4096,
    ),
}


def fwd_bwd_seconds(model, batch, micro_batch) -> tuple[float, float]:
    """(forward+backward, forward) seconds over the calibration batch, all parameters trainable."""
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    sync()
    t0 = time.time()
    for i in range(0, batch.shape[0], micro_batch):
        x = batch[i : i + micro_batch].to(dev)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    sync()
    fb = time.time() - t0
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, batch.shape[0], micro_batch):
            model(input_ids=batch[i : i + micro_batch].to(dev), use_cache=False)
    sync()
    return fb, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random-init model of this shape (timing)")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--estimators", default="imatrix,snr,fisher,hutchinson")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--budgets", default="2.25,2.5,3.0")
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse per-estimator tables already in --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    names = [e for e in args.estimators.split(",") if e]
    bits = [2, 3, 4, 5, 6, 8]

    if args.shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        tok = load_tokenizer(args.model)
        cfg = AutoConfig.for_model("llama", **SHAPES[args.shape])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(args.device).eval()
        batch = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_len))
        calib_info = {"random_tokens": True}
    else:
        model, tok = load_model(args.model, args.device), load_tokenizer(args.model)
        batch, spec = calibration_batches(tok, args.calib, args.samples, args.seq_len, 0)
        calib_info = spec.to_dict()
    targets = find_targets(model)
    reused = args.reuse and all(os.path.isfile(os.path.join(args.out, f"table_{e}.parquet")) for e in names)
    if reused:  # timings stay those of the run that computed the tables (timing.csv)
        fb = float("nan")
    else:
        fb, fwd = fwd_bwd_seconds(model, batch, args.micro_batch)
        print(f"forward+backward {fb:.1f} s, forward {fwd:.1f} s over {batch.numel()} tokens", flush=True)

    tables, timing = [], []
    for e in names:
        path = os.path.join(args.out, f"table_{e}.parquet")
        if args.reuse and os.path.isfile(path):
            t = SensitivityTable.load(path)
            secs = t.meta["estimator_info"][e]["seconds"]
        else:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            t = compute_sensitivity(
                model,
                targets,
                batch,
                estimators=e,
                bits=bits,
                group_size=args.group_size,
                micro_batch=args.micro_batch,
                probes=args.probes,
                calib_info=calib_info,
            )
            secs = time.time() - t0
            t.meta["model_name"] = args.shape or args.model
            t.save(path)
        row = {
            "estimator": e,
            "seconds": round(secs, 2),
            "ratio_to_fwd_bwd": round(secs / fb, 2),
            "fwd_bwd_seconds": round(fb, 2),
            "device": args.device,
        }
        if torch.cuda.is_available():
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        timing.append(row)
        print(row, flush=True)
        tables.append(t)
    if args.shape and torch.cuda.is_available():  # block-by-block on the GPU, whole model vs offloaded
        for offload in (False, True):
            m = AutoModelForCausalLM.from_config(cfg).eval()
            m = (
                m.to(args.device)
                if not offload
                else __import__("bitsearch.blocks", fromlist=["offload_blocks"]).offload_blocks(m, args.device)
            )
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            compute_sensitivity(
                m,
                find_targets(m),
                batch,
                estimators="imatrix,snr",
                bits=bits,
                group_size=args.group_size,
                calibrate="none",
                micro_batch=args.micro_batch,
                offload=offload,
            )
            timing.append(
                {
                    "estimator": "imatrix+snr (inputs only)",
                    "offload": offload,
                    "seconds": round(time.time() - t0, 2),
                    "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    "device": args.device,
                }
            )
            print(timing[-1], flush=True)
            del m
    if not reused:
        pd.DataFrame(timing).to_csv(os.path.join(args.out, "timing.csv"), index=False)
    if args.timing_only:
        return

    table = SensitivityTable.merge(tables)
    table.save(os.path.join(args.out, "sensitivity.parquet"))
    plot_sensitivity(table, os.path.join(args.out, "sensitivity.png"), estimator="snr" if "snr" in names else None)
    fp = model_fingerprint(model, targets)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def ev(plan):
        model.load_state_dict(state)
        if plan is not None:
            fake_quantize_model(model, plan)
        r = api.evaluate(
            model,
            args.eval_text,
            EvalConfig(max_tokens=args.max_tokens, seq_len=512, show_progress=False),
            tokenizer=tok,
        )
        model.load_state_dict(state)
        return r.ppl

    float_ppl = ev(None)
    print(f"float ppl {float_ppl:.2f}", flush=True)
    runs = [(e, "greedy", e) for e in names] + [("mix", "greedy", None)]
    if "snr" in names:
        runs.append(("snr", "snr", "snr"))
    # rows are appended to rows.jsonl as they are measured; --reuse keeps the ones already there
    log = os.path.join(args.out, "rows.jsonl")
    done = {}
    if args.reuse and os.path.isfile(log):
        for line in open(log):
            r = json.loads(line)
            done[(r["estimator"], r["method"], r["budget"])] = r
    elif os.path.isfile(log):
        os.remove(log)

    def measure(label, method, budget, plan):
        key = (label, method, budget)
        if key not in done:
            done[key] = {
                "estimator": label,
                "method": method,
                "budget": budget,
                "avg_bits": plan.summary["avg_bits"],
                "bytes": plan.summary["bytes"],
                "ppl": ev(plan),
                "predicted_error": plan.summary["predicted_error"],
            }
            with open(log, "a") as f:
                f.write(json.dumps(done[key]) + "\n")
        print(done[key], flush=True)
        return done[key]

    rows = []
    for budget in args.budgets.split(","):
        for label, method, mix in runs:
            config = SearchConfig(budget=budget, method=method, mix=mix, min_bits=None)
            plan = api.search_plan(table, targets, fp, config)
            rows.append(measure(label, method, float(budget), plan))
    for w in (2, 3):
        config = SearchConfig(budget="16", method="uniform", bits=[w], min_bits=None)
        plan = api.search_plan(table, targets, fp, config)
        rows.append(measure(f"W{w}", "uniform", None, plan))
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(args.out, "results.csv"), index=False)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "float_ppl": float_ppl, "results": rows, "timing": timing}, f, indent=1)
    plot = df.copy()
    plot["method"] = np.where(
        plot["method"] == "uniform",
        "uniform",
        plot["estimator"] + np.where(plot["method"] == "snr", " (water-filling)", ""),
    )
    plot_ppl_vs_bits(
        plot,
        os.path.join(args.out, "ppl_vs_bits.png"),
        float_ppl=float_ppl,
        title=f"{os.path.basename(os.path.normpath(args.model))}: plans per estimator (greedy) vs uniform RTN",
    )
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
