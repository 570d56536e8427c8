"""GPTQ export served: per-module plans at one budget exported as GPTQ, loaded without bitsearch,
perplexity there against ``bitsearch eval`` of the same plan.

Two plans from one sensitivity table (imatrix, layer-loss calibrated, widths 2, 3, 4, 8 and 16),
both the exact ``ilp`` optimum with q/k/v and gate/up sharing one width, priced in GPTQ's bytes:

- ``mixed``: menu 2, 3, 4, 8, 16. Widths other than the main one are ``dynamic`` overrides, which
  transformers does not read: loaded with gptqmodel's own loader (a transformers model; loaded in
  float16, run in float32).
- ``one-width``: menu 2, 16. One quantized width and dense modules: loaded by transformers'
  ``from_pretrained`` (optimum + gptqmodel), the model's float32.

Each: export, ``bitsearch apply`` + ``eval`` of the plan, and the loader's perplexity computed by
its own windowing code on the first --max-tokens tokens (512-token windows).

    python -m studies.gptq_serving --client-python /path/to/venv-with-gptqmodel/bin/python \\
        --out studies/results/gptq_serving

Computes the table into --out unless --sensitivity names one. Writes results.json and the plans.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from bitsearch import api
from bitsearch.config import SearchConfig, SensitivityConfig
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.search.formats import module_search_options
from bitsearch.sensitivity import SensitivityTable

from .servability import SHARED, serving_check

PLANS = {
    # name: (menu, loader)
    "mixed": ("2,3,4,8,16", "gptqmodel"),
    "one-width": ("2,16", "transformers"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"), help="model folder")
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"), help="calibration text")
    ap.add_argument("--sensitivity", default=None, help="table with curves for 2,3,4,8,16 (default: computed)")
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--budget", default="2.5", help="avg-bit budget, in GPTQ's bytes")
    ap.add_argument("--max-tokens", type=int, default=40000, help="evaluation tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--client-python", default=sys.executable, help="interpreter with optimum and gptqmodel")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    if args.sensitivity:
        table = SensitivityTable.load(args.sensitivity)
    else:
        config = SensitivityConfig(bits="2,3,4,8,16", threads=args.threads, show_progress=False)
        where = os.path.join(args.out, "sensitivity.parquet")
        table = api.sensitivity(model, args.calib, config, tokenizer=tok, out=where, overwrite=True)
    targets = find_targets(model)
    fp = model_fingerprint(model, targets)
    rows = []
    for name, (menu, loader) in PLANS.items():
        config = SearchConfig(
            budget=args.budget,
            method="ilp",
            bits=menu,
            min_bits=2,
            group_size=table.group_size,
            format="gptq",
            **module_search_options(fused=True),
        )
        plan = api.search_plan(table, targets, fp, config)
        plan.save(os.path.join(args.out, f"plan-{name}.json"))
        with tempfile.TemporaryDirectory() as work:
            check = serving_check(model, tok, plan, args, work, "gptq", args.client_python, loader)
        s = plan.summary
        row = {
            "plan": name,
            "menu": menu,
            "avg_bits": s["format"]["avg_bits"],
            "widths": {int(k): v for k, v in s["histogram"].items()},
            **check,
        }
        rows.append(row)
        print(
            f"{name}: {row['avg_bits']:.4f} bits, {loader} ppl {check['transformers_ppl']:.4f}, bitsearch eval "
            f"{check['bitsearch_eval_ppl']:.4f}, relative difference {check['rel_diff']:.2e}",
            flush=True,
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "seconds": round(time.time() - t0, 1)}, f, indent=1)


if __name__ == "__main__":
    main()
