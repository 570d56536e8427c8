"""How much of each layer type's rounding error a finalizer removes, by width.

The search methods score plans by round-to-nearest; a user finalizes the plan with SignRound or
QAT. Where a finalizer repairs some layers' rounding error much better than others', a plan that
moves bits toward the layers round-to-nearest hurts most is optimising error the finalizer would
have removed anyway (README, "After finalization").

For one plan and packed checkpoints of it (``bitsearch finalize`` outputs, or the scratch
checkpoints ``python -m studies.confidence --finalize`` leaves in ``<out>/tmp-finalized``), on the float
model's inputs to every target layer over calibration tokens: the output error of each row,
||(W_q - W) x||^2 summed over tokens, for round-to-nearest and for each checkpoint, summed per
(layer type, width). Printed and saved as a table: each checkpoint's error as a fraction of
round-to-nearest's.

    python -m studies.finalizer_repair --plan studies/results/search_methods_v8/diffq_2.5.json \\
        --packed signround=studies/results/confidence-plans-signround-2.5/tmp-finalized \\
                 qat=studies/results/confidence-plans-qat-2.5/tmp-finalized \\
        --out studies/results/finalizer_repair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

from bitsearch.atomic import write_text_atomic
from bitsearch.data import calibration_batches
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.quantize import fake_quantize_model
from bitsearch.sensitivity.stats import InputStats

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def input_grams(model, names, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of every named Linear's input over all tokens of ``batch`` (float model), by the
    sensitivity pass's own input statistics (shared inputs such as q/k/v collected once)."""
    with InputStats({n: model.get_submodule(n) for n in names}, "full") as stats:
        for row in batch:
            model(row[None])
            stats.end_pass()
    return {n: stats.total(n) for n in names}


def row_errors(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||delta_r x||^2 summed over the tokens, per row r: diag(delta G delta^T)."""
    d = delta.double()
    return ((d @ gram) * d).sum(dim=1)


def weight_of(model, name: str) -> torch.Tensor:
    mod = model.get_submodule(name)
    return (mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight).detach().float()


def repair_table(plan: BitPlan, float_model, rtn_model, packed: dict, grams: dict) -> list[dict]:
    """Per (layer type, width): round-to-nearest's output error and each checkpoint's, summed."""
    sums = defaultdict(lambda: defaultdict(float))
    for name, bits in plan.bits.items():
        w = weight_of(float_model, name)
        b = torch.as_tensor(bits.astype("int64"))
        errs = {
            label: row_errors(weight_of(m, name) - w, grams[name]) for label, m in {"rtn": rtn_model, **packed}.items()
        }
        kind = name.rsplit(".", 1)[-1]
        for width in torch.unique(b).tolist():
            rows = b == width
            key = (kind, int(width))
            sums[key]["rows"] += int(rows.sum())
            for label, e in errs.items():
                sums[key][label] += float(e[rows].sum())
    out = []
    for (kind, width), s in sorted(sums.items()):
        row = {"layer type": kind, "width": width, "rows": int(s["rows"]), "rtn error": s["rtn"]}
        for label in packed:
            row[f"{label} / rtn"] = s[label] / s["rtn"]
        out.append(row)
    return out


def markdown(rows: list[dict], labels) -> str:
    head = (
        "| layer type | width | rows | round-to-nearest output error | "
        + " | ".join(f"{x}: error / round-to-nearest's" for x in labels)
        + " |"
    )
    out = [head, "|" + " --- |" * (4 + len(labels))]
    for r in rows:
        out.append(
            f"| {r['layer type']} | {r['width']} | {r['rows']} | {r['rtn error']:.4g} | "
            + " | ".join(f"{r[f'{x} / rtn']:.3f}" for x in labels)
            + " |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--plan", required=True)
    ap.add_argument("--packed", nargs="+", required=True, help="LABEL=DIR of packed checkpoints of --plan")
    ap.add_argument(
        "--calib-text",
        default=os.path.join(HERE, "results", "benchmark", "slm-llama-17m-quick", "kl.txt"),
        help="text for the layers' inputs (default: the benchmark's held-out KL split, no finalizer saw it)",
    )
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "finalizer_repair"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [p.split("=", 1) for p in args.packed]
    for p in pairs:
        if len(p) != 2 or not os.path.isdir(p[1]):
            sys.exit(f"finalizer_repair: --packed takes LABEL=DIR of a packed checkpoint (got '{'='.join(p)}')")
    if not os.path.exists(args.calib_text):
        sys.exit(f"finalizer_repair: text '{args.calib_text}' does not exist (pass --calib-text)")
    plan = BitPlan.load(args.plan)
    float_model = load_model(args.model, "cpu", "float32").eval()
    packed = {label: load_model(path, "cpu", "float32").eval() for label, path in pairs}
    batch, _ = calibration_batches(load_tokenizer(args.model), args.calib_text, args.samples, args.seq_len, 0)
    grams = input_grams(float_model, list(plan.bits), batch)
    rtn_model = fake_quantize_model(load_model(args.model, "cpu", "float32").eval(), plan)
    rows = repair_table(plan, float_model, rtn_model, packed, grams)
    md = markdown(rows, list(packed))
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "finalizer_repair.md"), md)
    write_text_atomic(
        os.path.join(args.out, "finalizer_repair.json"), json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n"
    )
    print(md)
    return rows


if __name__ == "__main__":
    main()
