"""``bitsearch demo``: the whole pipeline on the small model and public-domain texts that ship
inside the package, offline, in a few minutes on 2 CPU cores.

sensitivity (imatrix, gradient calibrated) -> greedy plans at a few budgets -> packed
checkpoints -> perplexity on held-out text, beside uniform round-to-nearest at 2, 3 and 4 bits
stored the same way. Writes plans, ``results.csv`` (also printed) and ``ppl_vs_bits.png``.
"""

from __future__ import annotations

import copy
import os
import time
from importlib import resources

import numpy as np
import pandas as pd
import torch

from . import api
from .config import ApplyConfig, EvalConfig, SearchConfig, SensitivityConfig
from .errors import BitsearchError
from .evaluate import EvalResult
from .io.checkpoint import packed_tensor_bytes
from .io.loading import load_model, load_tokenizer
from .models import find_targets, model_fingerprint
from .plots import plot_ppl_vs_bits
from .search import build_problem

__all__ = ["demo_paths", "run_demo", "DEMO_SETTINGS"]

#: settings of the demo run (small enough for 2 CPU cores in well under 3 minutes)
DEMO_SETTINGS = dict(
    samples=16,
    seq_len=256,
    group_size=64,
    loss_calibration_samples=16,
    bits="2,3,4,5,6,8",
    eval_seq_len=256,
    eval_max_tokens=8192,
    uniform_widths=(2, 3, 4),
)


def demo_paths() -> dict[str, str]:
    root = resources.files("bitsearch") / "assets" / "demo"
    paths = {"model": str(root / "model"), "calib": str(root / "calib.txt"), "eval": str(root / "eval.txt")}
    for k, p in paths.items():
        if not os.path.exists(p):
            raise BitsearchError(f"the bundled demo {k} is missing at {p} (broken install?)")
    return paths


def _parse_budgets(budgets: str) -> list[str]:
    out = [b.strip() for b in budgets.split(",") if b.strip()]
    if not out:
        raise BitsearchError("`budgets` is empty")
    return out


def run_demo(out: str, budgets: str = "2.5,3.0,3.5", show_progress: bool = True) -> pd.DataFrame:
    s = DEMO_SETTINGS
    paths = demo_paths()
    budget_list = _parse_budgets(budgets)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(paths["model"])
    tok = load_tokenizer(paths["model"])

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    say(
        f"demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
        f"calibration {s['samples']} x {s['seq_len']} tokens of calib.txt; widths {s['bits']}"
    )
    table_path = os.path.join(out, "sensitivity.parquet")
    table = api.sensitivity(
        model,
        paths["calib"],
        SensitivityConfig(
            samples=s["samples"],
            seq_len=s["seq_len"],
            group_size=s["group_size"],
            bits=s["bits"],
            loss_calibration_samples=s["loss_calibration_samples"],
            show_progress=show_progress,
        ),
        tokenizer=tok,
        out=table_path,
    )
    say(f"sensitivity: {len(table.df)} channels in {len(table.layers)} layers -> {table_path}")
    targets = find_targets(model)
    fp = model_fingerprint(model, targets)

    def evaluate(name: str, m) -> EvalResult:
        r = api.evaluate(
            m,
            paths["eval"],
            EvalConfig(seq_len=s["eval_seq_len"], max_tokens=s["eval_max_tokens"], show_progress=show_progress),
            tokenizer=tok,
        )
        r.model = name
        return r

    float_ppl = evaluate("float", model).ppl
    say(f"float perplexity on the first {s['eval_max_tokens']} tokens of eval.txt: {float_ppl:.2f}")
    rows = []
    runs = [("greedy", b) for b in budget_list]
    problem = build_problem(table, targets)
    for w in s["uniform_widths"]:  # uniform RTN at exactly the bytes of width w everywhere
        k = problem.bits.index(w)
        bytes_w = problem.bytes_of(np.full(problem.n_channels, k))
        runs.append(("uniform", f"{bytes_w}B"))
    for method, budget in runs:
        plan = api.search_plan(
            table,
            targets,
            fp,
            SearchConfig(budget=budget, method=method),
            provenance={"model_name": "bundled demo model"},
        )
        tag = f"{method}_{plan.summary['avg_bits']:.2f}"
        plan_path = os.path.join(out, f"plan_{tag}.json")
        plan.save(plan_path)
        packed_dir = os.path.join(out, f"packed_{tag}")
        api.apply(copy.deepcopy(model), plan, ApplyConfig(), tokenizer=tok, out=packed_dir)
        written = packed_tensor_bytes(packed_dir)
        r = evaluate(tag, load_model(packed_dir))  # evaluated from the file written
        rows.append(
            {
                "method": method,
                "budget": budget,
                "avg_bits": plan.summary["avg_bits"],
                "bytes": written,
                "plan_bytes": plan.summary["bytes"],
                "pruned_channels": plan.summary["pruned_channels"],
                "ppl": r.ppl,
                "predicted_loss_increase": plan.summary["predicted_error"],
                "plan": os.path.basename(plan_path),
            }
        )
        say(
            f"{method:7s} budget {budget}: {plan.summary['avg_bits']:.3f} bits, "
            f"{written} bytes written (plan {plan.summary['bytes']}), ppl {r.ppl:.2f}"
        )
    df = pd.DataFrame(rows)
    csv = os.path.join(out, "results.csv")
    df.to_csv(csv, index=False)
    png = plot_ppl_vs_bits(
        df, os.path.join(out, "ppl_vs_bits.png"), float_ppl=float_ppl, title="bitsearch demo: bundled model, eval.txt"
    )
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df.drop(columns=["plan", "plan_bytes"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    say(f"float ppl {float_ppl:.2f}; wrote {csv} and {png}")
    return df
