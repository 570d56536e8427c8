"""Perplexity, closeness to the float model and confidence on the evaluation text.

The benchmark's two measures disagree (README): held-out KL ranks one method first, evaluation
perplexity another. This study measures, on slm-llama-17m, how far a quantized model's
perplexity change on the evaluation text follows its closeness to the float model there
(KL(float || model)) and its change of confidence (the entropy of its predictions).

1. The float model alone, its logits divided by a temperature T (no quantization): perplexity
   and mean predictive entropy on the evaluation text (wikitext2, out of the model's training
   distribution) and on the held-out calibration-domain text. Where perplexity falls as T grows
   above 1, a model only made less confident scores better there, whatever its fidelity.
2. The benchmark's points that recorded the entropy of their predictions on the evaluation text
   (``benchmark.py`` does since this study): the perplexity change against the float model
   (in %) fitted by least squares on the entropy change alone, on the evaluation-text KL to the
   float model alone, and on both, with R^2 and residuals; and a plot of every point over the
   float model's temperature curve.
3. Saved bit plans (``--plans``, e.g. the search-methods study's greedy, optuna and diffq plans),
   applied by round-to-nearest, or (``--finalize signround|qat``) by the benchmark's SignRound
   or tiled QAT with its --quick settings on its calibration split: perplexity, evaluation-text
   KL, entropy change and held-out distance measures, each plan compared window by window with
   the first plan of its budget (paired perplexity, KL and tail-token NLL changes with 95 %
   intervals): does a plan that loses perplexity also lose closeness to the float model on the
   evaluation text, and does the ranking of the plans survive finalization?

Nothing here is tuned on the evaluation text: T is a probe, never applied to a model.

    python -m studies.confidence --points studies/results/benchmark/slm-llama-17m-quick-confidence \\
        --out studies/results/confidence
    python -m studies.confidence --out studies/results/confidence-plans \\
        --plans studies/results/search_methods_v4/greedy_2.5.json ...
    python -m studies.confidence --out studies/results/confidence-plans-qat --finalize qat --plans ...
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from bitsearch.atomic import write_text_atomic
from bitsearch.data import calibration_batches, read_text, tokenize_text
from bitsearch.evaluate import windows
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.plots import plot_confidence
from bitsearch.quantize import fake_quantize_model
from studies.benchmark import finalize_plan, settings

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def temperature_curve(
    model, ids: torch.Tensor, temperatures, max_tokens: int | None, seq_len: int = 512, micro_batch: int = 4
) -> list[dict]:
    """Perplexity and mean entropy of softmax(logits / T) for each T, on the same windows as
    ``bitsearch.evaluate.perplexity`` (T = 1 reproduces it)."""
    nll = np.zeros(len(temperatures))
    ent = np.zeros(len(temperatures))
    count = 0
    for w in windows(ids, seq_len, max_tokens):
        for i in range(0, w.shape[0], micro_batch):
            x = w[i : i + micro_batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            tgt = x[:, 1:]
            for k, t in enumerate(temperatures):
                logp = F.log_softmax(logits / t, dim=-1)
                nll[k] -= logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
                ent[k] -= (logp.exp() * logp).sum().item()
            count += tgt.numel()
    return [{"T": t, "ppl": math.exp(n / count), "entropy": e / count} for t, n, e in zip(temperatures, nll, ent)]


def load_points(folders) -> tuple[list[dict], dict]:
    """Every measured point with an entropy, and the float point of their folder (all folders must
    share one float model measurement)."""
    rows, ref = [], None
    for folder in folders:
        f = json.load(open(os.path.join(folder, "points", "float.json")))
        if "entropy" not in f:
            sys.exit(f"confidence: {folder} has no float entropy: rerun python -m studies.benchmark on it")
        if ref is not None and abs(f["ppl"] - ref["ppl"]) > 1e-9:
            sys.exit(f"confidence: {folder} was evaluated on other tokens than the other folders")
        ref = f
        for path in sorted(glob.glob(os.path.join(folder, "points", "*@*.json"))):
            r = json.load(open(path))
            if "eval_kl" in r:
                rows.append(r)
    if ref is None:
        sys.exit("confidence: no --points folders given")
    return rows, ref


def fit(columns: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Least squares y ~ c0 + sum_i c_i x_i: (coefficients, R^2, residuals)."""
    X = np.column_stack([np.ones_like(y)] + columns)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    return coef, 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum()), resid


def analyse(rows: list[dict], ref: dict) -> dict:
    d_ent = np.array([r["entropy"] - ref["entropy"] for r in rows])
    d_ppl = np.array([100 * (r["ppl"] / ref["ppl"] - 1) for r in rows])
    eval_kl = np.array([r["eval_kl"] for r in rows])
    out = {}
    for name, cols in [("entropy", [d_ent]), ("eval_kl", [eval_kl]), ("entropy+eval_kl", [d_ent, eval_kl])]:
        coef, r2, resid = fit(cols, d_ppl)
        out[name] = {
            "coef": coef.tolist(),
            "r2": r2,
            "residuals": resid.tolist(),
            "rms_residual": float(np.sqrt((resid**2).mean())),
        }
    return out


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(exp a || exp b) of each sequence of (B, T, V) log-probabilities, summed over T."""
    return (a.exp() * (a - b)).double().sum((1, 2))


@torch.no_grad()
def window_stats(
    model, reference, ids: torch.Tensor, max_tokens: int | None, seq_len: int = 512, tail: float = 0.01
) -> dict:
    """Per 512-token window (the windows of ``bitsearch.evaluate.perplexity``), summed over its
    predictions: ``n`` tokens, the model's ``nll`` of the true next tokens and ``entropy``;
    KL(reference || model) of the distributions at temperatures 1, 2 and 4 (both softened alike,
    as in distillation: ``kl``, ``kl_t2``, ``kl_t4``); ``reverse_kl`` KL(model || reference); and
    ``tail``, the NLL change (model - reference) on the tokens the reference gives < ``tail``."""
    parts = []
    for w in windows(ids, seq_len, max_tokens):
        for x in w.split(4):
            logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            ref = F.log_softmax(reference(input_ids=x).logits[:, :-1].float(), dim=-1)
            tgt = x[:, 1:].unsqueeze(-1)
            qy, py = logp.gather(-1, tgt).squeeze(-1).double(), ref.gather(-1, tgt).squeeze(-1).double()
            softened = [_kl(F.log_softmax(ref / t, dim=-1), F.log_softmax(logp / t, dim=-1)) for t in (2, 4)]
            parts.append(
                torch.stack(
                    [
                        torch.full((x.shape[0],), float(tgt.shape[1]), dtype=torch.float64),
                        -qy.sum(1),
                        -(logp.exp() * logp).double().sum((1, 2)),
                        _kl(ref, logp),
                        *softened,
                        _kl(logp, ref),
                        ((py - qy) * (py.exp() < tail)).sum(1),
                    ],
                    1,
                )
            )
    keys = ("n", "nll", "entropy", "kl", "kl_t2", "kl_t4", "reverse_kl", "tail")
    return dict(zip(keys, torch.cat(parts).T.numpy()))


def distance_measures(
    model, reference, ids: torch.Tensor, max_tokens: int | None, seq_len: int = 512, tail: float = 0.01
) -> dict:
    """``window_stats`` per predicted token over the whole text: the model's true-token ``nll``,
    ``kl_t1`` / ``kl_t2`` / ``kl_t4``, ``reverse_kl`` and ``tail_nll_change``."""
    st = window_stats(model, reference, ids, max_tokens, seq_len, tail)
    names = {
        "nll": "nll",
        "kl_t1": "kl",
        "kl_t2": "kl_t2",
        "kl_t4": "kl_t4",
        "reverse_kl": "reverse_kl",
        "tail_nll_change": "tail",
    }
    return {name: float(st[key].sum() / st["n"].sum()) for name, key in names.items()}


def paired(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Mean per-token difference of ``key`` (a - b) over the same windows, and its standard error
    from the spread of the per-window differences (windows taken as independent samples)."""
    d = (a[key] - b[key]) / a["n"]
    w = a["n"] / a["n"].sum()
    mean = float((w * d).sum())
    se = float(np.sqrt((w**2 * (d - mean) ** 2).sum() * len(d) / (len(d) - 1)))
    return mean, se


def plan_points(
    paths, model_dir: str, float_model, eval_ids, heldout_ids, max_tokens, heldout_tokens, quantize=fake_quantize_model
) -> list[dict]:
    """Each plan applied to a fresh copy of the model by ``quantize(model, plan)`` (in place;
    default round-to-nearest) and measured like a benchmark point; each compared, window by
    window on the evaluation text, with the first plan listed for the same budget (perplexity and
    evaluation-text KL change, with 95 % intervals)."""
    rows, first, stats = [], {}, {}
    for path in paths:
        plan = BitPlan.load(path)
        m = load_model(model_dir, "cpu", "float32").eval()
        t0 = time.time()
        quantize(m, plan)
        m.eval()
        seconds = time.time() - t0
        st = window_stats(m, float_model, eval_ids, max_tokens)
        held = distance_measures(m, float_model, heldout_ids, heldout_tokens)
        n = st["n"].sum()
        budget = str(plan.provenance.get("budget", "?"))
        row = {
            "plan": path,
            "allocator": plan.provenance.get("allocator", "?"),
            "budget": budget,
            "bytes": plan.n_bytes(),
            "ppl": math.exp(st["nll"].sum() / n),
            "entropy": st["entropy"].sum() / n,
            "eval_kl": st["kl"].sum() / n,
            "eval_tail_nll_change": st["tail"].sum() / n,
            "kl": held["kl_t1"],
            "heldout": held,
            "quantize_seconds": round(seconds, 1),
        }
        base = first.setdefault(budget, path)
        stats[path] = st
        if base != path:
            b = stats[base]
            base_kl = b["kl"].sum() / b["n"].sum()
            (dn, sn), (dk, sk) = paired(st, b, "nll"), paired(st, b, "kl")
            dt, st_ = paired(st, b, "tail")
            row.update(
                vs=base,
                ppl_change=[100 * math.expm1(dn), 100 * 1.96 * sn],
                eval_kl_change=[100 * dk / base_kl, 100 * 1.96 * sk / base_kl],
                nll_change=[dn, 1.96 * sn],
                tail_nll_change=[dt, 1.96 * st_],
            )
        rows.append(row)
        print(
            f"{path}: ppl {row['ppl']:.2f}, evaluation-text KL {row['eval_kl']:.4f}, held-out KL {held['kl_t1']:.4f}",
            flush=True,
        )
    return rows


def plans_markdown(rows: list[dict], float_entropy: float, finalizer: str = "round-to-nearest") -> str:
    out = [
        f"| plan ({finalizer}) | allocator | bytes | ppl | entropy change | evaluation-text KL "
        "| KL, --heldout-text (calibration domain; the plan's search may have sampled it) "
        "| against the first plan of its budget: ppl, evaluation-text KL, NLL (nats / token) and the part of it "
        "on tokens the float model gives < 1 % (95 % intervals) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs = "—"
        if "vs" in r:
            vs = (
                f"{r['ppl_change'][0]:+.2f} ± {r['ppl_change'][1]:.2f} %, "
                f"{r['eval_kl_change'][0]:+.2f} ± {r['eval_kl_change'][1]:.2f} %, "
                f"{r['nll_change'][0]:+.4f} ± {r['nll_change'][1]:.4f}, "
                f"{r['tail_nll_change'][0]:+.4f} ± {r['tail_nll_change'][1]:.4f}"
            )
        out.append(
            f"| {r['plan']} | {r['allocator']} | {r['bytes']} | {r['ppl']:.2f} | "
            f"{r['entropy'] - float_entropy:+.4f} | {r['eval_kl']:.4f} | {r['kl']:.4f} | {vs} |"
        )
    keys = list(rows[0]["heldout"])
    out += [
        "",
        "On --heldout-text, per token: " + ", ".join(keys) + " (``distance_measures``).",
        "",
        "| plan | " + " | ".join(keys) + " |",
        "|" + " --- |" * (len(keys) + 1),
    ]
    for r in rows:
        out.append(f"| {r['plan']} | " + " | ".join(f"{r['heldout'][k]:.5f}" for k in keys) + " |")
    return "\n".join(out) + "\n"


def markdown(curves: dict, rows: list[dict], ref: dict, fits: dict) -> str:
    out = ["| T | " + " | ".join(f"{name}: ppl, entropy" for name in curves) + " |", "|" + " --- |" * (len(curves) + 1)]
    for k, t in enumerate(next(iter(curves.values()))):
        out.append(
            f"| {t['T']:g} | " + " | ".join(f"{c[k]['ppl']:.2f}, {c[k]['entropy']:.4f}" for c in curves.values()) + " |"
        )
    if not rows:
        return "\n".join(out) + "\n"
    out += [
        "",
        "| point | avg bits | ppl change | entropy change | evaluation-text KL | held-out KL "
        "| ppl change not explained by the evaluation-text KL fit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    resid = dict(zip((id(r) for r in rows), fits["eval_kl"]["residuals"]))
    for r in sorted(rows, key=lambda r: (r["budget"], r["eval_kl"])):
        out.append(
            f"| {r['label']} @ {r['budget']} | {r['avg_bits']:.2f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.2f} % | "
            f"{r['entropy'] - ref['entropy']:+.4f} | {r['eval_kl']:.4f} | {r['kl']:.4f} | {resid[id(r)]:+.2f} % |"
        )
    out += ["", "Least-squares fits of the perplexity change (%) over these points:", ""]
    for name, f in fits.items():
        terms = " + ".join(f"{c:+.3g} {v}" for c, v in zip(f["coef"][1:], name.split("+")))
        out.append(f"- {f['coef'][0]:+.3g} {terms}: R^2 = {f['r2']:.3f}, rms residual {f['rms_residual']:.2f} %")
    return "\n".join(out) + "\n"


FINALIZERS = {
    "rtn": "round-to-nearest",
    "signround": "SignRound, benchmark --quick settings",
    "qat": "tiled QAT, benchmark --quick settings",
}


def quantizer(args, tok):
    """``quantize(model, plan)`` for ``--finalize``: round-to-nearest, or the benchmark's finalizer
    with its --quick settings on calibration samples of ``--calib-text`` (the same for every plan)."""
    if args.finalize == "rtn":
        return fake_quantize_model
    # the benchmark's calibration windows are 512 tokens (its --seq-len)
    a = SimpleNamespace(
        **{"seq_len": 512, **settings(quick=True)}, model=args.model, device="cpu", out=args.out, seed=0
    )
    batch, _ = calibration_batches(tok, args.calib_text, a.samples, a.seq_len, 0)
    return lambda model, plan: finalize_plan(model, tok, plan, batch, args.finalize, a)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument(
        "--heldout-text",
        default=os.path.join(HERE, "results", "benchmark", "slm-llama-17m-quick", "kl.txt"),
        help="calibration-domain text no method saw (default: the benchmark's KL split)",
    )
    ap.add_argument("--max-tokens", type=int, default=40000, help="evaluation tokens (the benchmark's --quick)")
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--temperatures", default="0.9,0.95,1,1.02,1.05,1.1,1.2")
    ap.add_argument("--points", nargs="*", default=[], help="benchmark output folders whose points have entropies")
    ap.add_argument("--plans", nargs="*", default=[], help="bit plans to apply (--finalize) and measure")
    ap.add_argument(
        "--finalize",
        choices=("rtn", "signround", "qat"),
        default="rtn",
        help="how --plans are applied: round-to-nearest, or the benchmark's SignRound or tiled QAT with "
        "its --quick settings on --calib-text",
    )
    ap.add_argument(
        "--calib-text",
        default=os.path.join(HERE, "results", "benchmark", "slm-llama-17m-quick", "calib.txt"),
        help="calibration text of --finalize signround|qat (default: the benchmark's calibration split)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "confidence"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    temps = [float(t) for t in args.temperatures.split(",")]
    if 1.0 not in temps:
        sys.exit("confidence: --temperatures must include 1")
    if args.plans and args.finalize != "rtn" and not os.path.exists(args.calib_text):
        sys.exit(
            f"confidence: --finalize {args.finalize} needs calibration text: '{args.calib_text}' does not exist "
            "(the benchmark writes it: run python -m studies.benchmark --quick once, or pass --calib-text)"
        )
    os.makedirs(args.out, exist_ok=True)
    tok, model = load_tokenizer(args.model), load_model(args.model, "cpu", "float32").eval()
    ids = {
        "evaluation text": tokenize_text(tok, read_text(args.eval_text)),
        "held-out text": tokenize_text(tok, read_text(args.heldout_text)),
    }
    curves = {}
    for name, n in (("evaluation text", args.max_tokens), ("held-out text", args.heldout_tokens)):
        curves[name] = temperature_curve(model, ids[name], temps, n)
        for c in curves[name]:
            print(f"{name}: T={c['T']:g}: ppl {c['ppl']:.2f}, entropy {c['entropy']:.4f}", flush=True)
    result = {"curves": curves}
    rows, ref = load_points(args.points) if args.points else ([], None)
    if len(rows) >= 3:
        fits = analyse(rows, ref)
        result.update(points=rows, float=ref, fits=fits)
        plot_confidence(curves["evaluation text"], rows, ref, os.path.join(args.out, "confidence.png"))
    md = markdown(curves, rows if "fits" in result else [], ref, result.get("fits", {}))
    if args.plans:
        result["plans"] = plan_points(
            args.plans,
            args.model,
            model,
            ids["evaluation text"],
            ids["held-out text"],
            args.max_tokens,
            args.heldout_tokens,
            quantizer(args, tok),
        )
        result["finalize"] = args.finalize
        one = next(c for c in curves["evaluation text"] if c["T"] == 1.0)
        md += "\n" + plans_markdown(result["plans"], one["entropy"], FINALIZERS[args.finalize])
    write_text_atomic(os.path.join(args.out, "confidence.md"), md)
    write_text_atomic(os.path.join(args.out, "confidence.json"), json.dumps(result, indent=1) + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
