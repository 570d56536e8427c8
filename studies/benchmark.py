"""bitsearch against the quantizers users would pick instead, at the same stored bytes (issue 7).

At each budget (average bits per target weight, all-in: codes plus every scale, zero and width
map the method stores) every method gets the largest configuration it has that fits, and is
measured the same way: stored bytes, perplexity on the evaluation text (with, since the
confidence study, KL(float || quantized) and the mean entropy of the predictions there),
KL(float || quantized) on held-out text the calibration never saw, and the wall time of
quantizing (for bitsearch: sensitivity + search + finalize).

Targets are the decoder blocks' Linear layers (the embeddings and the tied lm_head stay float
for every method). Bytes are counted from each method's own storage:

* bitsearch's grid (round-to-nearest, GPTQ, llama.cpp rule mixes, the HAWQ-style plan): b-bit
  codes, one float16 scale and one uint8 zero per row and group; bitsearch's own mixed plans
  add one byte per row for its width (``BitPlan.n_bytes``); per-tensor plans need no such map.
* HQQ: b-bit codes, float16 scale and float16 zero per group (b + 32/G bits).
* AutoRound: b-bit codes, float16 scale and b-bit zero per group (b + (16 + b)/G bits).

Methods (``--methods``, default all):

* ``rtn-g128``, ``rtn-channel``: uniform round-to-nearest, groups of 128 / one group per row;
  the largest width that fits.
* ``gptq``: ``studies/reference/gptq.py`` (act order, static groups, 1 % damping, true-sequential) at the
  largest (width, group 32/64/128) that fits.
* ``hqq``, ``autoround``: the PyPI packages (optional extras: ``pip install -e .[benchmark]``),
  skipped with a note when missing; same choice of (width, group). AutoRound runs asymmetric,
  like every other method here; ``autoround-sym`` runs it symmetric (its own default; its packed
  formats store a zero point all the same, so the bytes are counted alike).
* ``autoscheme``: AutoRound's own per-layer mixed-precision search (``AutoScheme``, options W2 /
  W3 / W4 at g128, its layer scores on the same calibration tokens, ``peers.autoscheme_quantize``)
  within the budget by the same byte count, then AutoRound at each layer's width.
* ``llamacpp``: llama.cpp's per-tensor rule mixes (``studies/reference/llamacpp_mixes.py``), the (mix,
  group) pair storing the most bytes that fit, round-to-nearest.
* ``hawq``: HAWQ-style per-layer plan: Hutchinson Hessian trace x quantization error per
  layer (bitsearch's ``hutchinson`` estimator, uncalibrated) and the ``ilp`` allocator at layer
  granularity, round-to-nearest.
* ``bitsearch``: the imatrix estimator (calibrated) and the ``greedy`` allocator, applied with
  round-to-nearest (``bitsearch-rtn``), SignRound (``bitsearch-signround``) and forward-tiled
  QAT (``bitsearch-qat``, the pipeline issue 6's study found best; what the README calls
  "bitsearch"). ``bitsearch-optuna-qat`` (not in --quick) searches with optuna instead of greedy.
  ``bitsearch-uniform-signround`` and ``bitsearch-uniform-qat`` use the ``uniform`` allocator
  instead (one width and group for every row, the largest that fits): bitsearch's finalizers
  on the configuration the uniform peers get, which separates what the plan adds from what
  the finalizer adds.
  ``-gptq`` and ``-gptq-signround`` (after ``bitsearch-uniform`` or ``bitsearch``) round with
  GPTQ, or with SignRound starting from GPTQ's rounding (``finalize --method signround --init
  gptq``); ``bitsearch-file-*`` finalize the plan given by ``--plan-file``. The rounding
  finalizers see the calibration batch as AutoRound does (``--samples`` x ``--seq-len``).

Every point is cached as JSON in ``--out/points`` (a killed run resumes; ``--redo`` recomputes).
With ``--save-models`` each point's quantized weights are kept too, and a later run with
``--from-run`` that folder measures them again (e.g. on the whole evaluation text) without
quantizing again.
The results go to ``--out/benchmark-<tag>.json``, ``.md`` (the table the README includes) and
``.png`` (perplexity against stored bits, every method, the float model as a line).

    python -m studies.benchmark --quick --threads 1                         # CPU: 40k eval tokens
    python -m studies.benchmark --device cuda --out studies/results/benchmark  # full test set
    python -m studies.benchmark --model meta-llama/Llama-3.2-1B --device cuda --tag llama1b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from bitsearch import api
from bitsearch.atomic import write_text_atomic
from bitsearch.config import EvalConfig, FinalizeConfig, SearchConfig, SensitivityConfig
from bitsearch.cost import budget_to_bytes
from bitsearch.data import calibration_batches, read_text
from bitsearch.finalize.gptq import gptq_quantize
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets
from bitsearch.plots import plot_methods
from bitsearch.quantize import fake_quantize_model
from bitsearch.search.uniform import uniform_plan
from studies.reference.llamacpp_mixes import best_rule_mix, per_tensor_bytes, rule_mix_plan
from studies.reference.peers import storage_bits

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
HERE = os.path.dirname(os.path.abspath(__file__))
BUDGETS = (2.25, 2.5, 3.0, 3.25, 4.25)
WIDTHS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
METHODS = (
    "rtn-g128",
    "rtn-channel",
    "gptq",
    "hqq",
    "autoround",
    "autoround-sym",
    "autoscheme",
    "llamacpp",
    "hawq",
    "bitsearch-rtn",
    "bitsearch-signround",
    "bitsearch-qat",
    "bitsearch-optuna-qat",
    "bitsearch-uniform-signround",
    "bitsearch-uniform-qat",
    "bitsearch-uniform-gptq",
    "bitsearch-uniform-gptq-signround",
    "bitsearch-gptq-signround",
    "bitsearch-file-gptq",
    "bitsearch-file-signround",
    "bitsearch-file-gptq-signround",
    "bitsearch-file-gptq-qat",
)
QUICK_SKIP = (
    "bitsearch-optuna-qat",
    "bitsearch-file-gptq",
    "bitsearch-file-signround",
    "bitsearch-file-gptq-signround",
    "bitsearch-file-gptq-qat",
)
COLORS = dict(
    zip(
        METHODS,
        (
            "tab:blue",
            "tab:orange",
            "tab:green",
            "tab:red",
            "tab:purple",
            "mediumpurple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "0.45",
            "gold",
            "tab:cyan",
            "navy",
            "darkgoldenrod",
            "teal",
            "salmon",
            "crimson",
            "darkorange",
            "olivedrab",
            "slategray",
            "darkgreen",
            "indigo",
        ),
    )
)
LABELS = {
    "rtn-g128": "RTN g128",
    "rtn-channel": "RTN per-channel",
    "gptq": "GPTQ",
    "hqq": "HQQ",
    "autoround": "AutoRound",
    "autoround-sym": "AutoRound symmetric",
    "autoscheme": "AutoRound AutoScheme",
    "llamacpp": "llama.cpp rule mix",
    "hawq": "HAWQ-style layer ILP",
    "bitsearch-rtn": "bitsearch plan + RTN",
    "bitsearch-signround": "bitsearch plan + SignRound",
    "bitsearch-qat": "bitsearch plan + tiled QAT",
    "bitsearch-optuna-qat": "bitsearch optuna plan + tiled QAT",
    "bitsearch-uniform-signround": "bitsearch uniform + SignRound",
    "bitsearch-uniform-gptq": "bitsearch uniform + GPTQ",
    "bitsearch-uniform-gptq-signround": "bitsearch uniform + GPTQ + SignRound",
    "bitsearch-gptq-signround": "bitsearch plan + GPTQ + SignRound",
    "bitsearch-file-gptq": "--plan-file + GPTQ",
    "bitsearch-file-signround": "--plan-file + SignRound",
    "bitsearch-file-gptq-signround": "--plan-file + GPTQ + SignRound",
    "bitsearch-file-gptq-qat": "--plan-file + GPTQ + tiled QAT",
    "bitsearch-uniform-qat": "bitsearch uniform + tiled QAT",
}


class Skip(Exception):
    """A method that has no configuration at a budget, or is not installed (the table says why)."""


class Bench:
    """Shared state: the model path, tokenizer, calibration batch, budgets' byte counts, caches."""

    def __init__(self, args):
        self.args = args
        self.tok = load_tokenizer(args.model)
        self.float_model = self.fresh()
        self.targets = find_targets(self.float_model)
        self.n_weights = sum(t.out_features * t.in_features for t in self.targets)
        self.shapes = [(t.out_features, t.in_features) for t in self.targets]
        self.per_row = max(t.in_features for t in self.targets)
        os.makedirs(os.path.join(args.out, "points"), exist_ok=True)
        self.calib_path, self.kl_path = split_heldout(args.calib, args.out)
        self.batch, _ = calibration_batches(self.tok, self.calib_path, args.samples, args.seq_len, 0)

    def fresh(self):
        return load_model(self.args.model, self.args.device, self.args.dtype)

    def budget_bytes(self, budget: float) -> int:
        return budget_to_bytes(budget, self.n_weights)

    def best_uniform(self, budget: float, groups, meta=lambda w: 24, nbytes=None) -> tuple[int, int, int]:
        """(width, group, bytes) of the largest uniform configuration within the budget: bytes of
        b-bit codes and ``meta(b)`` bits per row and group, or ``nbytes(width, group)``."""
        count = nbytes or (lambda w, g: math.ceil(storage_bits(self.shapes, w, g, meta(w)) / 8))
        limit, best = self.budget_bytes(budget), None
        for w in WIDTHS:
            for g in groups:
                n = count(w, g)
                if n <= limit and (best is None or n > best[2]):
                    best = (w, g, n)
        if best is None:
            raise Skip(f"no uniform configuration fits {budget} bits")
        return best

    def table(self, estimator: str, calibrate: str) -> tuple[str, float]:
        """A sensitivity table on the calibration text, computed once (path, seconds it took)."""
        path = os.path.join(self.args.out, f"sensitivity-{estimator}.parquet")
        meta = path + ".seconds"
        if not os.path.exists(path) or not os.path.exists(meta):
            t0 = time.time()
            api.sensitivity(
                self.args.model,
                self.calib_path,
                SensitivityConfig(
                    samples=self.args.samples,
                    seq_len=self.args.seq_len,
                    estimators=estimator,
                    loss_calibration=calibrate,
                    probes=self.args.probes,
                    device=self.args.device,
                    show_progress=False,
                ),
                out=path,
                overwrite=True,
            )
            write_text_atomic(meta, f"{time.time() - t0:.1f}\n")
        return path, float(open(meta).read())

    def plan(self, budget: float, method: str = "greedy", estimator: str = "imatrix", calibrate: str = "auto", **kw):
        """(plan, seconds of table + search, the float model the search loaded: quantize that one)."""
        table, secs = self.table(estimator, calibrate)
        m = self.fresh()
        t0 = time.time()
        plan = api.search(
            m,
            self.calib_path,
            SearchConfig(
                budget=str(budget),
                method=method,
                mix=estimator,
                samples=self.args.samples,
                seq_len=self.args.seq_len,
                show_progress=False,
                **kw,
            ),
            tokenizer=self.tok,
            table=table,
        )
        return plan, secs + time.time() - t0, m


def split_heldout(path: str, out: str, fraction: float = 0.8) -> tuple[str, str]:
    """The calibration text's first ``fraction`` (cut at a line end) for calibration, the rest
    for the KL measurement, written to ``out``."""
    text = read_text(path)
    cut = text.find("\n", int(len(text) * fraction))
    cut = len(text) if cut < 0 else cut + 1
    paths = os.path.join(out, "calib.txt"), os.path.join(out, "kl.txt")
    for p, part in zip(paths, (text[:cut], text[cut:])):
        if not os.path.exists(p) or read_text(p) != part:
            write_text_atomic(p, part)
    return paths


# ---------------------------------------------------------------------------------------------
# methods: each returns (quantized model, {"bytes", "config", "seconds"})


def rtn(bench: Bench, budget: float, per_channel: bool):
    w, g, n = bench.best_uniform(budget, [bench.per_row] if per_channel else [128])
    m = bench.fresh()
    t0 = time.time()
    fake_quantize_model(m, uniform_plan(m, w, g))
    return m, {
        "bytes": n,
        "config": f"W{w} " + ("per-channel" if per_channel else f"g{g}"),
        "seconds": time.time() - t0,
    }


def gptq(bench: Bench, budget: float):
    w, g, n = bench.best_uniform(budget, GROUPS)
    m = bench.fresh()
    t0 = time.time()
    gptq_quantize(m, uniform_plan(m, w, g), bench.batch, show_progress=False)
    return m, {"bytes": n, "config": f"W{w} g{g} act-order", "seconds": time.time() - t0}


def _peers(package: str):
    """studies.reference.peers, or Skip with the reason ``package`` cannot be imported."""
    from studies.reference import peers

    why = peers.available().get(package)
    if why:
        raise Skip(why)
    return peers


def peer_package(bench: Bench, budget: float, name: str, sym: bool = False):
    peers = _peers(name)
    meta = (lambda w: 32) if name == "hqq" else (lambda w: 16 + w)
    w, g, _ = bench.best_uniform(budget, GROUPS, meta)
    m = bench.fresh()
    if name == "hqq":
        info = peers.hqq_quantize(m, w, g, device=bench.args.device)
    else:
        info = peers.autoround_quantize(
            m,
            bench.tok,
            bench.batch,
            w,
            g,
            iters=bench.args.autoround_iters,
            device=bench.args.device,
            sym=sym,
            seed=bench.args.seed,
        )
    return m, {
        "bytes": int(info["stored_bytes"]),
        "config": info.get("config", f"W{w} g{g}"),
        "seconds": info["seconds"],
    }


def autoscheme(bench: Bench, budget: float):
    peers = _peers("autoround")
    m = bench.fresh()
    try:
        info = peers.autoscheme_quantize(
            m, bench.tok, bench.batch, budget, iters=bench.args.autoround_iters, device=bench.args.device
        )
    except peers.BudgetTooSmall as e:
        raise Skip(str(e)) from None
    return m, {"bytes": int(info["stored_bytes"]), "config": info["config"], "seconds": info["seconds"]}


def llamacpp(bench: Bench, budget: float):
    m = bench.fresh()
    t0 = time.time()
    best = best_rule_mix(m, bench.budget_bytes(budget))
    if best is None:
        need = per_tensor_bytes(rule_mix_plan(m, "Q2_K", bench.per_row))
        raise Skip(f"the smallest k-quant mix (Q2_K, one group per row) needs {8 * need / bench.n_weights:.2f} bits")
    plan, n = best
    fake_quantize_model(m, plan)
    group = "per-channel" if plan.group_size == bench.per_row else f"g{plan.group_size}"
    return m, {"bytes": n, "config": f"{plan.provenance['allocator'].split()[1]} {group}", "seconds": time.time() - t0}


def hawq(bench: Bench, budget: float):
    plan, secs, m = bench.plan(budget, method="ilp", estimator="hutchinson", calibrate="none", granularity="layer")
    t0 = time.time()
    fake_quantize_model(m, plan)
    widths = {int(np.unique(b)[0]) for b in plan.bits.values()}
    return m, {
        "bytes": per_tensor_bytes(plan),
        "config": f"widths {sorted(widths)} g{plan.group_size}",
        "seconds": secs + time.time() - t0,
    }


def uniform_bitsearch_plan(bench: Bench, budget: float):
    """bitsearch's ``uniform`` allocator over the benchmark's (width, group) pairs: the pair whose
    plan (bit map included, ``BitPlan.n_bytes``) stores the most bytes within the budget."""
    m = bench.fresh()
    w, g, _ = bench.best_uniform(budget, GROUPS, nbytes=lambda w, g: uniform_plan(m, w, g).n_bytes())
    return uniform_plan(m, w, g), 0.0, m


def finalize_plan(model, tok, plan, batch: torch.Tensor, finalizer: str, a) -> None:
    """Quantize ``model`` in place to ``plan`` with ``finalizer`` (``rtn``, or a registered finalizer
    ``signround``, ``gptq``, ``qat`` (tiled), or ``INIT-METHOD`` such as ``gptq-signround``: METHOD
    starting from INIT's rounding) on the calibration ``batch``, with the finalizer settings in
    ``a`` (``SETTINGS``). The rounding
    finalizers see the calibration batch as AutoRound does ([samples, seq_len]); QAT sees it in
    windows of ``a.qat_seq_len``."""
    if finalizer == "rtn":
        fake_quantize_model(model, plan)
        return
    init, _, method = finalizer.rpartition("-")
    opts = dict(method=method, init=init or "rtn", signround_steps=a.signround_steps, seed=a.seed)
    if method == "qat":
        opts.update(mode="tiled", steps=a.qat_steps, lr=a.qat_lr, batch_size=a.qat_batch_size)
        if batch.shape[1] % a.qat_seq_len == 0:
            batch = batch.reshape(-1, a.qat_seq_len)
    config = FinalizeConfig(
        seq_len=batch.shape[1], samples=batch.shape[0], device=a.device, show_progress=False, **opts
    )
    api.finalize(model, plan, batch, config, tokenizer=tok)


def bitsearch_pipeline(bench: Bench, budget: float, finalizer: str, search: str = "greedy"):
    kw = {}
    if search == "optuna":  # no plan file: the study lives in memory, a fresh one per point
        kw = dict(n_trials=bench.args.optuna_trials, sampler="tpe", span=0.0, kl_samples=48)
    if search == "uniform":
        plan, secs, m = uniform_bitsearch_plan(bench, budget)
    elif search == "file":
        if not bench.args.plan_file:
            raise Skip("no --plan-file given")
        plan, secs, m = BitPlan.load(bench.args.plan_file), 0.0, bench.fresh()
        if plan.n_bytes() > bench.budget_bytes(budget):
            raise Skip(f"--plan-file stores {plan.n_bytes()} bytes, over the budget")
    else:
        plan, secs, m = bench.plan(budget, method=search, **kw)
    t0 = time.time()
    finalize_plan(m, bench.tok, plan, bench.batch, finalizer, bench.args)
    config = (
        plan.provenance["allocator"]
        if search == "uniform"
        else os.path.basename(bench.args.plan_file)
        if search == "file"
        else f"{search}, imatrix"
    ) + f", {finalizer}"
    return m, {"bytes": plan.n_bytes(), "config": config, "seconds": secs + time.time() - t0}


RUNNERS = {
    "rtn-g128": lambda b, x: rtn(b, x, per_channel=False),
    "rtn-channel": lambda b, x: rtn(b, x, per_channel=True),
    "gptq": gptq,
    "hqq": lambda b, x: peer_package(b, x, "hqq"),
    "autoround": lambda b, x: peer_package(b, x, "autoround"),
    "autoround-sym": lambda b, x: peer_package(b, x, "autoround", sym=True),
    "autoscheme": autoscheme,
    "llamacpp": llamacpp,
    "hawq": hawq,
    "bitsearch-rtn": lambda b, x: bitsearch_pipeline(b, x, "rtn"),
    "bitsearch-signround": lambda b, x: bitsearch_pipeline(b, x, "signround"),
    "bitsearch-qat": lambda b, x: bitsearch_pipeline(b, x, "qat"),
    "bitsearch-optuna-qat": lambda b, x: bitsearch_pipeline(b, x, "qat", search="optuna"),
    "bitsearch-uniform-signround": lambda b, x: bitsearch_pipeline(b, x, "signround", search="uniform"),
    "bitsearch-uniform-qat": lambda b, x: bitsearch_pipeline(b, x, "qat", search="uniform"),
    "bitsearch-uniform-gptq": lambda b, x: bitsearch_pipeline(b, x, "gptq", search="uniform"),
    "bitsearch-uniform-gptq-signround": lambda b, x: bitsearch_pipeline(b, x, "gptq-signround", search="uniform"),
    "bitsearch-gptq-signround": lambda b, x: bitsearch_pipeline(b, x, "gptq-signround"),
    "bitsearch-file-gptq": lambda b, x: bitsearch_pipeline(b, x, "gptq", search="file"),
    "bitsearch-file-signround": lambda b, x: bitsearch_pipeline(b, x, "signround", search="file"),
    "bitsearch-file-gptq-signround": lambda b, x: bitsearch_pipeline(b, x, "gptq-signround", search="file"),
    "bitsearch-file-gptq-qat": lambda b, x: bitsearch_pipeline(b, x, "gptq-qat", search="file"),
}


# ---------------------------------------------------------------------------------------------


def measure(bench: Bench, model) -> dict:
    """Perplexity on the evaluation text, with the mean entropy of the predictions there and (for a
    quantized model) KL(float || model) there; KL(float || model) on the held-out text."""
    a = bench.args
    ref = None if model is bench.float_model or a.no_eval_kl else bench.float_model
    config = EvalConfig(max_tokens=a.max_tokens, seq_len=512, device=a.device, show_progress=False)
    ev = api.evaluate(model, a.eval_text, config, tokenizer=bench.tok, reference=ref)
    kl = api.evaluate(
        model, bench.kl_path, replace(config, max_tokens=a.kl_tokens), tokenizer=bench.tok, reference=bench.float_model
    ).kl
    out = {"ppl": ev.ppl, "kl": kl, "entropy": ev.entropy}
    if ref is not None:
        out["eval_kl"] = ev.kl
    return out


def _target_weights(model, names) -> dict[str, torch.Tensor]:
    """The weight of every target ``names`` as the model computes with it (a packed layer's
    dequantized one)."""
    out = {}
    for name in names:
        mod = model.get_submodule(name)
        w = mod.dequantized_weight() if hasattr(mod, "dequantized_weight") else mod.weight
        out[name] = w.detach().float().cpu().clone()
    return out


def save_model(bench: Bench, model, method: str, budget: float) -> None:
    """The quantized model's target weights (--save-models), for a later --from-run measurement."""
    os.makedirs(os.path.join(bench.args.out, "models"), exist_ok=True)
    torch.save(
        _target_weights(model, [t.name for t in bench.targets]),
        os.path.join(bench.args.out, "models", f"{method}@{budget}.pt"),
    )


def saved_model(bench: Bench, method: str, budget: float):
    """(the float model with the target weights --save-models kept in the --from-run folder, the
    run's point without its measurements)."""
    base = bench.args.from_run
    weights = os.path.join(base, "models", f"{method}@{budget}.pt")
    point = os.path.join(base, "points", f"{method}@{budget}.json")
    if not os.path.exists(weights) or not os.path.exists(point):
        raise Skip(f"not saved in {base}")
    m = bench.fresh()
    with torch.no_grad():
        for name, w in torch.load(weights).items():
            m.get_submodule(name).weight.copy_(w.to(m.get_submodule(name).weight.dtype))
    info = {k: v for k, v in json.load(open(point)).items() if k in ("bytes", "config", "seconds")}
    return m, dict(info, measured_from=base)


def run_point(bench: Bench, method: str, budget: float) -> dict:
    path = os.path.join(bench.args.out, "points", f"{method}@{budget}.json")
    if os.path.exists(path) and not bench.args.redo:
        return json.load(open(path))
    row = {
        "method": method,
        "label": LABELS[method],
        "budget": budget,
        "family": "bitsearch" if method.startswith("bitsearch") else "peer",
    }
    if bench.args.table_only:
        return dict(row, missing=True)
    try:
        if bench.args.from_run:
            model, info = saved_model(bench, method, budget)
        else:
            model, info = RUNNERS[method](bench, budget)
            if bench.args.save_models:
                save_model(bench, model, method, budget)
        row.update(info, avg_bits=8 * info["bytes"] / bench.n_weights, **measure(bench, model))
        row["seconds"] = round(row["seconds"], 1)
    except Skip as e:
        row["skipped"] = str(e)
    write_text_atomic(path, json.dumps(row, indent=1) + "\n")
    return row


def float_point(bench: Bench) -> dict:
    path = os.path.join(bench.args.out, "points", "float.json")
    row = json.load(open(path)) if os.path.exists(path) else {}
    if "entropy" not in row:  # not measured yet, or measured before points recorded the entropy
        row = {"method": "float", "label": "float", "avg_bits": 32.0, **measure(bench, bench.float_model)}
        write_text_atomic(path, json.dumps(row, indent=1) + "\n")
    return row


def markdown(rows: list[dict], ref: dict, budgets) -> str:
    """Two tables: perplexity (stored bits) per method and budget; then KL, time and configuration;
    a third, for the methods whose points have them, with the evaluation-text KL and entropy change."""
    by = {(r["method"], r["budget"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"{b} bits" for b in budgets) + " |"
    rule = "|" + " --- |" * (len(budgets) + 1)

    def cell(r, detail: bool) -> str:
        if r is None or r.get("missing"):
            return "not run yet"
        if "skipped" in r:
            return "—" if detail else f"— ({r['skipped']})"
        if detail:
            return f"{r['kl']:.4f}, {r['seconds']:.0f} s, {r['config']}"
        text = f"{r['ppl']:.2f} ({r['avg_bits']:.2f})"
        return f"**{text}**" if r["method"] == "bitsearch-qat" else text

    out = [head, rule]
    for m in methods:
        out.append(f"| {LABELS[m]} | " + " | ".join(cell(by.get((m, b)), False) for b in budgets) + " |")
    out += [
        "",
        f"Perplexity (stored bits per target weight, all-in); float model {ref['ppl']:.2f}.",
        "",
        head.replace("| method |", "| KL, quantization time, configuration |"),
        rule,
    ]
    for m in methods:
        out.append(f"| {LABELS[m]} | " + " | ".join(cell(by.get((m, b)), True) for b in budgets) + " |")
    if "entropy" in ref and any("eval_kl" in r for r in rows):

        def confidence(r) -> str:
            if r is None or "eval_kl" not in r:
                return "—" if r is not None and "skipped" in r else "not measured"
            return f"{r['eval_kl']:.4f}, {r['entropy'] - ref['entropy']:+.4f}"

        out += [
            "",
            "On the evaluation text: KL(float || model), and the change of the mean entropy of the "
            f"predictions against the float model's {ref['entropy']:.4f} nats (positive: less confident).",
            "",
            head.replace("| method |", "| evaluation-text KL, entropy change |"),
            rule,
        ]
        for m in (m for m in methods if any("eval_kl" in r for r in rows if r["method"] == m)):
            out.append(f"| {LABELS[m]} | " + " | ".join(confidence(by.get((m, b))) for b in budgets) + " |")
    return "\n".join(out) + "\n"


def verdict(rows: list[dict], ref: dict) -> list[str]:
    """Where the bitsearch pipeline beats every peer at equal or larger size, and where not (by
    perplexity for the tiled-QAT pipeline; by held-out KL, and by evaluation-text KL where points
    have it, for bitsearch's best finalizer); of each peer that does better, its smallest
    configuration that does."""
    out = []
    ok = [r for r in rows if "skipped" not in r and not r.get("missing")]

    def smallest(points):  # of each peer that does better, its smallest configuration that does
        first = {}
        for p in sorted(points, key=lambda p: p["avg_bits"]):
            first.setdefault(p["method"], p)
        return sorted(first.values(), key=lambda p: p["avg_bits"])

    for r in (r for r in ok if r["method"] == "bitsearch-qat"):
        beaten_by = smallest(
            p for p in ok if p["family"] == "peer" and p["avg_bits"] >= r["avg_bits"] - 1e-9 and p["ppl"] <= r["ppl"]
        )
        state = (
            "beats every peer measured at equal or larger size"
            if not beaten_by
            else "beaten by "
            + ", ".join(f"{p['label']} at {p['avg_bits']:.2f} bits ({p['ppl']:.2f})" for p in beaten_by)
        )
        out.append(
            f"{r['budget']} bits: bitsearch {r['ppl']:.2f} ({100 * (r['ppl'] / ref['ppl'] - 1):+.1f} % vs float): "
            + state
        )
    # the same question by KL to the float model, for bitsearch's best finalizer at each budget: on the
    # held-out text, and (where points have it) on the evaluation text, which perplexity is measured on
    for key, name in (("kl", "by KL"), ("eval_kl", "by evaluation-text KL")):
        have = [r for r in ok if key in r]
        for budget in dict.fromkeys(r["budget"] for r in have if r["family"] == "bitsearch"):
            best = min((r for r in have if r["family"] == "bitsearch" and r["budget"] == budget), key=lambda r: r[key])
            beaten_by = smallest(
                p
                for p in have
                if p["family"] == "peer" and p["avg_bits"] >= best["avg_bits"] - 1e-9 and p[key] <= best[key]
            )
            state = (
                "lower than every peer measured at equal or larger size"
                if not beaten_by
                else "higher than "
                + ", ".join(f"{p['label']} at {p['avg_bits']:.2f} bits ({p[key]:.4f})" for p in beaten_by)
            )
            out.append(f"{budget} bits, {name}: {best['label']} {best[key]:.4f}: " + state)
    return out


# (setting, full run, --quick) for the options left unset on the command line
SETTINGS = [
    ("max_tokens", None, 40000),
    ("kl_tokens", 32768, 8192),
    ("qat_steps", 200, 80),
    ("qat_batch_size", 8, 4),
    ("qat_lr", 2e-4, 2e-4),
    ("qat_seq_len", 512, 256),
    ("signround_steps", 200, 100),
    ("samples", 128, 64),
    ("autoround_iters", 200, 50),
]


def settings(quick: bool) -> dict:
    """The benchmark's default settings, of the full run or of ``--quick``."""
    return {name: quick_value if quick else full for name, full, quick_value in SETTINGS}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument(
        "--calib",
        default=os.path.join(SHARED, "data", "corpus", "heldout.txt"),
        help="its first 80 %% calibrates, the rest measures KL",
    )
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU: first 40,000 evaluation tokens, shorter finalizers, no optuna pipeline",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default 128; --quick 64)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="evaluation tokens (default: all; --quick 40000; 0: all)"
    )
    ap.add_argument("--kl-tokens", type=int, default=None, help="default 32768; --quick 8192")
    ap.add_argument("--probes", type=int, default=8, help="Hutchinson probes of the HAWQ-style plan")
    ap.add_argument("--qat-steps", type=int, default=None, help="default 200; --quick 80")
    ap.add_argument("--qat-lr", type=float, default=None, help="default 2e-4")
    ap.add_argument("--qat-batch-size", type=int, default=None, help="default 8; --quick 4")
    ap.add_argument("--qat-seq-len", type=int, default=None, help="default 512; --quick 256")
    ap.add_argument("--signround-steps", type=int, default=None, help="default 200; --quick 100")
    ap.add_argument("--autoround-iters", type=int, default=None, help="default 200; --quick 50")
    ap.add_argument("--optuna-trials", type=int, default=60)
    ap.add_argument("--plan-file", default=None, help="the plan of the bitsearch-file-* methods")
    ap.add_argument(
        "--no-eval-kl",
        action="store_true",
        help="perplexity only on the evaluation text (no KL to the float model there: half the time)",
    )
    ap.add_argument(
        "--save-models",
        action="store_true",
        help="keep each point's quantized target weights in --out/TAG/models (for --from-run)",
    )
    ap.add_argument(
        "--from-run",
        default=None,
        help="measure the models an earlier --save-models run (its --out/TAG folder) kept, instead "
        "of quantizing again (e.g. on the whole evaluation text)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--seed", type=int, default=0, help="seeds the finalizers' and AutoRound's mini-batches (not the calibration)"
    )
    ap.add_argument("--redo", action="store_true", help="recompute cached points")
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="compute nothing: write the table and plot from the cached points ('not run yet' for the rest)",
    )
    ap.add_argument("--tag", default=None, help="default: the model's folder name, + '-quick'")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "benchmark"))
    args = ap.parse_args(argv)
    q = args.quick
    for name, value in settings(q).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_tokens == 0:
        args.max_tokens = None
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if not (q and m in QUICK_SKIP)]
    unknown = [m for m in methods if m not in RUNNERS]
    if unknown:
        sys.exit(f"benchmark: unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    budgets = [float(b) for b in args.budgets.split(",")]
    tag = args.tag or os.path.basename(os.path.normpath(args.model)) + ("-quick" if q else "")
    args.out = os.path.join(args.out, tag)
    os.makedirs(args.out, exist_ok=True)
    bench = Bench(args)
    ref = float_point(bench)
    print(f"float: ppl {ref['ppl']:.2f}", flush=True)
    rows = []
    for budget in budgets:
        for method in methods:
            t0 = time.time()
            r = run_point(bench, method, budget)
            rows.append(r)
            what = (
                r.get("skipped")
                or ("not run yet" if r.get("missing") else None)
                or f"{r['config']}: {r['avg_bits']:.3f} bits, ppl {r['ppl']:.2f}, KL {r['kl']:.4f}"
            )
            print(f"[{budget} bits] {LABELS[method]:34s} {what} ({time.time() - t0:.0f} s)", flush=True)
    lines = verdict(rows, ref)
    result = {
        "args": vars(args),
        "float": ref,
        "results": rows,
        "verdict": lines,
        "hardware": {
            "device": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    base = os.path.join(args.out, f"benchmark-{tag}")
    write_text_atomic(base + ".json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(base + ".md", markdown(rows, ref, budgets) + "\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    plot_methods(rows, ref, base + ".png", labels=LABELS, colors=COLORS, highlight="bitsearch-qat")
    print(markdown(rows, ref, budgets))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
