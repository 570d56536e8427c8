"""The price of servability: one sensitivity table, the same budgets, planned per channel (bitsearch's
packed format), per module and per fused group (compressed-tensors, what vLLM and transformers load).

Each plan is the exact ``ilp`` optimum of the table's curves at its granularity, priced in the bytes
of the format that stores it (per channel: bitsearch's packed checkpoint; per module / fused group:
compressed-tensors' bytes). Each is evaluated on the first --max-tokens tokens of the evaluation
text (512-token windows): perplexity and KL to the float model.

Then the serving check: the fused plan of the first budget is exported as compressed-tensors,
loaded by transformers in a process that never imports bitsearch (its own windowing and loss
code), and its perplexity is compared with ``bitsearch eval`` of the same plan's packed checkpoint.

    python -m studies.servability --out studies/results/servability

Writes results.csv, results.json (arguments, rows, the serving check) and the plans in --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
import torch

from bitsearch import api
from bitsearch.config import EvalConfig, ExportConfig, SearchConfig
from bitsearch.data import read_text, tokenize_text
from bitsearch.evaluate import perplexity
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.quantize import fake_quantize_model
from bitsearch.search.formats import module_search_options
from bitsearch.sensitivity import SensitivityTable

HERE = os.path.dirname(__file__)
SHARED = os.path.join(HERE, "..", "..", "shared")
FORMAT = "compressed-tensors"
GRANULARITIES = {
    # name: (ilp options, format)
    "channel": ({"granularity": "channel"}, None),
    "module": (module_search_options(fused=False), FORMAT),
    "fused": (module_search_options(fused=True), FORMAT),
}

# runs without bitsearch: transformers and the format's package (or gptqmodel's own loader, which
# gives a transformers model too; it loads in float16 only, and the model then runs in float32),
# its own perplexity code
SERVE = r"""
import json, math, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text_file, max_tokens, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
loader = sys.argv[6] if len(sys.argv) > 6 else "transformers"
tok = AutoTokenizer.from_pretrained(path)
if loader == "gptqmodel":
    from gptqmodel import GPTQModel
    model = GPTQModel.load(path, device="cpu", dtype=torch.float16).model.float().eval()
else:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok(open(text_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"][:max_tokens]
nll, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids), seq_len):
        x = torch.tensor([ids[start:start + seq_len]])
        if x.shape[1] < 2:
            continue
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
assert not any(m == "bitsearch" or m.startswith("bitsearch.") for m in sys.modules)
print(json.dumps({"ppl": math.exp(nll / count), "tokens": len(ids), "predicted": count}))
"""


def serving_check(
    model, tok, plan, args, work: str, format: str = FORMAT, python: str = sys.executable, loader: str = "transformers"
) -> dict:
    """Export ``plan`` in ``format``, perplexity in a process without bitsearch (``python``, loading
    with ``loader``: transformers, or gptqmodel's loader) vs ``bitsearch eval``."""
    ct_dir, packed_dir = os.path.join(work, "ct"), os.path.join(work, "packed")
    info = api.export(model, plan, ct_dir, ExportConfig(format=format), tokenizer=tok)
    api.apply(copy.deepcopy(model), plan, out=packed_dir, tokenizer=tok)
    ours = api.evaluate(
        packed_dir, args.eval_text, EvalConfig(max_tokens=args.max_tokens, seq_len=512, show_progress=False)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = os.path.join(work, "serve.py")
    with open(script, "w") as f:
        f.write(SERVE)
    res = subprocess.run(
        [python, script, ct_dir, args.eval_text, str(args.max_tokens), "512", str(args.threads), loader],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "budget": plan.provenance.get("budget"),
        "export_target_bytes": info["target_bytes"],
        "plan_format_bytes": plan.summary["format"]["bytes"],
        "bitsearch_eval_ppl": ours.ppl,
        "transformers_ppl": theirs["ppl"],
        "loader": loader,
        "tokens": theirs["tokens"],
        "rel_diff": abs(theirs["ppl"] - ours.ppl) / ours.ppl,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"), help="model folder")
    ap.add_argument(
        "--sensitivity",
        default=os.path.join(HERE, "results", "slm_budget_table", "sensitivity.parquet"),
        help="sensitivity table (default: slm_budget_table.py's imatrix table of slm-llama-17m)",
    )
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--budgets", default="2.5,3.25,4.25", help="avg-bit budgets")
    ap.add_argument("--max-tokens", type=int, default=40000, help="evaluation tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    table = SensitivityTable.load(args.sensitivity)
    targets = find_targets(model)
    fp = model_fingerprint(model, targets)
    ids = tokenize_text(tok, read_text(args.eval_text))
    float_eval = perplexity(model, ids, 512, args.max_tokens, show_progress=False)
    rows = [
        {
            "budget": None,
            "granularity": "float",
            "format": None,
            "avg_bits": None,
            "ppl": float_eval.ppl,
            "kl": 0.0,
            "predicted_error": 0.0,
            "widths": "",
        }
    ]
    print(f"float: ppl {float_eval.ppl:.3f}", flush=True)
    plans = {}
    for budget in args.budgets.split(","):
        for gran, (options, fmt) in GRANULARITIES.items():
            config = SearchConfig(
                budget=budget, method="ilp", min_bits=2, group_size=table.group_size, format=fmt, **options
            )
            plan = api.search_plan(table, targets, fp, config)
            plan.save(os.path.join(args.out, f"plan-{gran}-{budget}.json"))
            plans[(budget, gran)] = plan
            q = fake_quantize_model(copy.deepcopy(model), plan)
            r = perplexity(q, ids, 512, args.max_tokens, reference=model, show_progress=False)
            s = plan.summary
            row = {
                "budget": float(budget),
                "granularity": gran,
                "format": fmt or "bitsearch-packed",
                "avg_bits": s["format"]["avg_bits"] if fmt else s["avg_bits"],
                "ppl": r.ppl,
                "kl": r.kl,
                "predicted_error": s["predicted_error"],
                "widths": " ".join(f"{k}:{v}" for k, v in sorted(s["histogram"].items(), key=lambda kv: int(kv[0]))),
            }
            rows.append(row)
            print(f"{budget} {gran}: {row['avg_bits']:.4f} bits, ppl {r.ppl:.3f}, kl {r.kl:.4f}", flush=True)
            del q
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(args.out, "results.csv"), index=False)
    first = args.budgets.split(",")[0]
    with tempfile.TemporaryDirectory() as work:
        check = serving_check(model, tok, plans[(first, "fused")], args, work)
    print(
        f"serving check ({first} bits, fused): transformers ppl {check['transformers_ppl']:.4f}, "
        f"bitsearch eval {check['bitsearch_eval_ppl']:.4f}, relative difference {check['rel_diff']:.2e}",
        flush=True,
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {"args": vars(args), "rows": rows, "serving_check": check, "seconds": round(time.time() - t0, 1)},
            f,
            indent=1,
        )
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
