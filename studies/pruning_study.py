"""Pruning as zero bits on slm-llama-17m: no pruning vs row pruning vs coupled pruning.

From one imatrix table with e(0) curves (computed with ``--bits 0,2,3,4,5,6,8``), greedy plans
at each budget: ``--min-bits 2`` (no pruning), ``--min-bits 0 --no-coupling`` (single rows
pruned) and ``--min-bits 0`` (whole MLP channels and key-value head groups, freeing down_proj /
o_proj columns). Coupled plans are applied as packed checkpoints (smaller matrices) and their
outputs compared with the masked (fake-quantized) model's; every plan is evaluated on the first
--max-tokens tokens of wikitext2_test (512-token windows).

    python -m bitsearch sensitivity --model ../shared/models/slm-llama-17m \\
        --calib ../shared/data/corpus/heldout.txt --samples 64 --estimators imatrix \\
        --bits 0,2,3,4,5,6,8 --out studies/results/prune_imatrix0.parquet
    python -m studies.pruning_study --out studies/results/pruning
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import pandas as pd
import torch

from bitsearch import api
from bitsearch.config import EvalConfig, SearchConfig
from bitsearch.io.checkpoint import load_packed, packed_tensor_bytes
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.quantize import fake_quantize_model

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--table", default=os.path.join(HERE, "results", "prune_imatrix0.parquet"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--budgets", default="2.0,2.1,2.25,2.5")
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))

    def ppl_of(m) -> float:
        return api.evaluate(
            m, args.eval_text, EvalConfig(max_tokens=args.max_tokens, seq_len=512, show_progress=False), tokenizer=tok
        ).ppl

    rows = []
    for budget in args.budgets.split(","):
        for label, min_bits, coupling in (
            ("no pruning", 2, True),
            ("row pruning", 0, False),
            ("coupled pruning", 0, True),
        ):
            model.load_state_dict(state)
            try:
                config = SearchConfig(budget=budget, min_bits=min_bits, coupling=coupling, show_progress=False)
                plan = api.search(model, None, config, tokenizer=tok, table=args.table)
            except Exception as exc:  # e.g. below the smallest plan without pruning
                rows.append({"budget": float(budget), "plan": label, "error": str(exc).split(":")[0]})
                print(rows[-1], flush=True)
                continue
            s = plan.summary
            row = {
                "budget": float(budget),
                "plan": label,
                "avg_bits": s["avg_bits"],
                "bytes": s["bytes"],
                "pruned_rows": s["pruned_channels"],
                "dead_units": s["dead_units"],
                "predicted": s["predicted_error"],
            }
            fake_quantize_model(model, plan)
            row["ppl"] = ppl_of(model)
            if plan.couplings:
                with torch.no_grad():
                    masked = model(input_ids=ids).logits
                model.load_state_dict(state)
                with tempfile.TemporaryDirectory() as d:
                    api.apply(copy.deepcopy(model), plan, out=os.path.join(d, "p"))  # packs the copy in place
                    written = packed_tensor_bytes(os.path.join(d, "p"))
                    packed = load_packed(os.path.join(d, "p"))
                    mods = dict(packed.named_modules())
                    c = plan.couplings[0]
                    with torch.no_grad():
                        diff = (packed(input_ids=ids).logits - masked).abs().max().item()
                row.update(
                    written_bytes=written,
                    packed_vs_masked_max_abs=diff,
                    example_consumer=f"{c.consumer}: in_features {mods[c.consumer].in_features}",
                )
            rows.append(row)
            print(row, flush=True)
            pd.DataFrame(rows).to_csv(os.path.join(args.out, "results.csv"), index=False)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows}, f, indent=1)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
