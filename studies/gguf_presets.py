#!/usr/bin/env python
"""bitsearch's GGUF plans against llama.cpp's preset mixes, at the same file bytes, evaluated by llama.cpp.

For one model:

1. an importance matrix from the calibration text (``--samples`` windows of ``--seq-len`` tokens),
   written as a llama.cpp imatrix file, and an F32 GGUF export of the model;
2. every preset (``--presets``) made by llama.cpp's own quantizer (``llama_model_quantize``, what
   ``llama-quantize`` runs) from the F32 file with that imatrix;
3. at each preset's tensor-data bytes, bitsearch's per-tensor plan (greedy on llama.cpp's round-trip
   errors, same imatrix), exported as GGUF;
4. every file's perplexity computed by llama.cpp itself (llama-cpp-python, windows of 512 tokens,
   each from an empty cache) and by ``bitsearch eval`` on the same file (gguf-package dequantization
   into the transformers model), on the same token ids of the evaluation text.

Writes ``results.json``, ``results.csv`` and ``ppl_vs_bpw.png`` into ``--out``. Bits per weight
count the quantized matrices' tensor data (what the plans price), not norms or metadata.

    nice -n 10 python -m studies.gguf_presets --model ../shared/models/slm-llama-17m \\
        --out studies/results/gguf-presets/slm-llama-17m --max-tokens 19968 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bitsearch.api import evaluate
from bitsearch.config import EvalConfig
from bitsearch.data import calibration_batches, read_text, tokenize_text
from bitsearch.export import get_exporter
from bitsearch.gguf.imatrix import write_imatrix
from bitsearch.gguf.plan import TensorPlan
from bitsearch.gguf.runtime import LlamaCpp, llama_quantize
from bitsearch.gguf.search import allocate_gguf, build_gguf_problem, collect_imatrix, gguf_targets
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import model_fingerprint
from bitsearch.plots import plot_gguf_presets

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"]


def planned_bytes(path: str) -> int:
    """Tensor-data bytes of a GGUF's matrices (the tensors a plan prices)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)


def main() -> None:
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(shared, "models", "slm-llama-17m"))
    ap.add_argument("--calib", default=os.path.join(shared, "data", "corpus", "heldout.txt"))
    ap.add_argument("--text", default=os.path.join(shared, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    model, tok = load_model(args.model), load_tokenizer(args.model)
    batch, spec = calibration_batches(tok, args.calib, args.samples, args.seq_len, 0)
    targets = gguf_targets(model)
    n_weights = sum(t.numel for t in targets)
    imat = collect_imatrix(model, targets, batch, dataset=os.path.basename(args.calib), show_progress=False)
    im_path = os.path.join(args.out, "imatrix.gguf")
    write_imatrix(imat, im_path)
    exporter = get_exporter("gguf")
    f32 = TensorPlan(model=model_fingerprint(model, targets), types={t.name: "F32" for t in targets}, menu=["F32"])
    f32.fill_summary()
    f32_path = os.path.join(args.out, "f32.gguf")
    exporter.export(model, tok, f32, f32_path)
    gp = build_gguf_problem(model, batch, imatrix=imat, threads=args.threads, show_progress=False)

    ids = tokenize_text(tok, read_text(args.text))
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    meta = {
        "model": args.model,
        "calibration": spec.to_dict(),
        "text": args.text,
        "max_tokens": args.max_tokens,
        "n_weights": n_weights,
        "command": " ".join(sys.argv),
    }
    rows = []

    def measure(method: str, label: str, path: str) -> None:
        with LlamaCpp(path, n_ctx=512, threads=args.threads) as llm:
            ppl_cpp, n = llm.perplexity(ids.numpy(), 512)
        ours = evaluate(path, args.text, EvalConfig(max_tokens=args.max_tokens, seq_len=512, show_progress=False))
        b = planned_bytes(path)
        rows.append(
            {
                "method": method,
                "at": label,
                "file": os.path.basename(path),
                "tensor_bytes": b,
                "bpw": 8 * b / n_weights,
                "file_bytes": os.path.getsize(path),
                "ppl_llama_cpp": ppl_cpp,
                "ppl_bitsearch_eval": ours.ppl,
                "tokens": n,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:  # after every file: partial runs count
            json.dump({"meta": dict(meta, seconds=round(time.time() - t0, 1)), "rows": rows}, f, indent=1)

    measure("f32", "F32", f32_path)
    for preset in args.presets.split(","):
        path = os.path.join(args.out, f"preset-{preset}.gguf")
        llama_quantize(f32_path, path, preset, imatrix=imat, threads=args.threads)
        measure("llama.cpp", preset, path)
        plan = allocate_gguf(gp, f"{planned_bytes(path)}B")
        plan.imatrix, plan.path = "imatrix.gguf", os.path.join(args.out, f"bitsearch-{preset}.json")
        plan.save(plan.path)
        out = os.path.join(args.out, f"bitsearch-{preset}.gguf")
        exporter.export(model, tok, plan, out)
        measure("bitsearch", preset, out)
    import pandas as pd

    pd.DataFrame(rows).to_csv(os.path.join(args.out, "results.csv"), index=False)
    plot_gguf_presets(rows, os.path.join(args.out, "ppl_vs_bpw.png"), os.path.basename(os.path.normpath(args.model)))


if __name__ == "__main__":
    main()
