"""GPTQ on bitsearch's grid and per-row widths, from the command line: the peer baseline of the
benchmark and a finalizer of any bitsearch plan ("bitsearch plan + GPTQ rounding"). The
algorithm lives in :mod:`bitsearch.finalize.gptq` (``bitsearch finalize --method gptq``); this
script quantizes a uniform plan (or a given one), packs it and evaluates it.

CLI (a uniform plan, every row at --bits, unless --plan is given)::

    python -m studies.reference.gptq --model ../shared/models/slm-llama-17m \\
        --calib ../shared/data/corpus/heldout.txt --bits 2 --group-size 128 --out runs/gptq_w2 \\
        --eval-text ../shared/data/corpus/wikitext2_test.txt --max-tokens 40000 --threads 1

Measured so (1 CPU thread, shared machine; 128 x 512 calibration tokens of heldout.txt; the
first 40,000 tokens of wikitext2_test, 512-token windows; the packed model evaluated):
W2 g128 2.2054 bits ppl 258.28 in 173 s, W3 g128 3.2054 bits ppl 224.21 in 172 s (float
223.73, round-to-nearest W2 298.32, W3 230.83 on the same tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bitsearch.finalize.gptq import GPTQResult, GPTQSettings, gptq_layer, gptq_quantize, sequential_groups
from bitsearch.io.plan import BitPlan
from bitsearch.quant.grid import QUANT_WIDTHS
from bitsearch.search.uniform import uniform_plan

__all__ = ["GPTQResult", "GPTQSettings", "gptq_layer", "gptq_quantize", "uniform_plan", "sequential_groups", "main"]


def main(argv: list[str] | None = None) -> dict:
    from bitsearch import api
    from bitsearch.config import EvalConfig
    from bitsearch.data import calibration_batches
    from bitsearch.io.checkpoint import save_packed
    from bitsearch.io.loading import load_model, load_tokenizer
    from bitsearch.quantize import pack_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text file")
    ap.add_argument("--bits", type=int, choices=list(QUANT_WIDTHS), help="uniform width (without --plan)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--plan", help="a bitsearch plan to finalize with GPTQ instead of a uniform one")
    ap.add_argument("--out", required=True, help="packed checkpoint folder")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--no-static-groups", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-text")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.plan is None) == (args.bits is None):
        ap.error("give exactly one of --bits and --plan")
    model = load_model(args.model, args.device)
    tok = load_tokenizer(args.model)
    if args.plan:
        plan = BitPlan.load(args.plan)
        if not plan.summary:
            plan.fill_summary()
    else:
        plan = uniform_plan(model, args.bits, args.group_size)
    batch, spec = calibration_batches(tok, args.calib, args.samples, args.seq_len, args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    settings = GPTQSettings(
        percdamp=args.percdamp,
        act_order=not args.no_act_order,
        static_groups=not args.no_static_groups,
        blocksize=args.blocksize,
        micro_batch=args.micro_batch,
        true_sequential=not args.no_true_sequential,
    )
    res = gptq_quantize(model, plan, batch, settings)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    described = (
        f"gptq percdamp={args.percdamp} act_order={not args.no_act_order} "
        f"static_groups={not args.no_static_groups} true_sequential={not args.no_true_sequential}"
    )
    plan.provenance = dict(
        plan.provenance, finalizer=described, calibration=f"{args.calib} {args.samples}x{args.seq_len} seed {args.seed}"
    )
    pack_model(model, plan, qparams=res)
    n_bytes = save_packed(model, plan, args.out, tok)
    summary = {
        "model": args.model,
        "plan": args.plan or f"uniform W{args.bits} g{args.group_size}",
        "gptq": described,
        "avg_bits": plan.summary["avg_bits"],
        "bytes": n_bytes,
        "plan_bytes": plan.n_bytes(),
        "quantize_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "calibration": f"{args.samples}x{args.seq_len}",
        "out": args.out,
    }
    print(
        f"gptq: quantized in {seconds:.1f} s; avg bits {plan.summary['avg_bits']:.4f} ({n_bytes} bytes); "
        f"packed checkpoint in {args.out}",
        flush=True,
    )
    if args.eval_text:
        r = api.evaluate(
            model,
            args.eval_text,
            EvalConfig(max_tokens=args.max_tokens, seq_len=args.eval_seq_len, show_progress=False),
            tokenizer=tok,
        )
        summary.update(ppl=r.ppl, eval_tokens=r.tokens, eval_text=args.eval_text)
        print(f"gptq: perplexity {r.ppl:.2f} on {r.tokens} tokens of {args.eval_text}", flush=True)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
