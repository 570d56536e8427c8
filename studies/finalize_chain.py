"""Finalizer chains from one cached rounding: a rounder (SignRound, GPTQ, GPTQ -> SignRound; or
``rtn``, round-to-nearest, nothing cached) runs
once on a uniform configuration (or a plan file), then each chain trains on from its result with
QAT (end-to-end distillation, tiled, or both) and is measured like the benchmark's points.

The rounding is the expensive part (SignRound at AutoRound's defaults: 200 steps per block on
128 x 512 tokens); it is cached in ``--out/start-<rounder>.pt`` ({layer: (scales, zeros)} and the
rounded target weights; a cache made for another plan or setting is refused), so each chain
costs only its training and measurement. Calibration, held-out split, evaluation and KL are the
benchmark's (``studies/benchmark.py``: the first 80 % of ``heldout.txt`` calibrates,
KL(float || quantized) on the last 20 % and on the evaluation text, perplexity on the whole
``wikitext2_test.txt`` by default).

    python -m studies.finalize_chain --config 3,128 --chains none,e2e:200:1e-4 \\
        --out studies/results/finalize/chain/w3g128

``--chains``: comma-separated ``MODE:STEPS:LR[:QPARAM_LR][:scales]`` (``MODE`` e2e, tiled or
tiled+e2e; Adam learning rates of the weights and of the step sizes and zeros, default the same;
``scales``: only the step sizes train, codes and zeros frozen at the rounding's; ``none`` = the
rounding alone). Each chain's point is cached as ``--out/points/<rounder>+<chain>.json``;
the table of this run's chains, then those earlier runs left there, goes to ``--out/chain.md``
and ``chain.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from types import SimpleNamespace

import torch

from bitsearch.atomic import write_text_atomic
from bitsearch.config import FinalizeConfig
from bitsearch.finalize import get_finalizer
from bitsearch.finalize.quantizer import convert
from bitsearch.finalize.train import TRAINABLE, QatSettings, finalize_qat
from bitsearch.io.plan import BitPlan
from bitsearch.quantize import pack_model
from bitsearch.search.uniform import uniform_plan
from studies.benchmark import SHARED, Bench, _target_weights, float_point, measure


def start(bench: Bench, plan, rounder: str, steps: int, seed: int = 0) -> tuple[dict, dict, float]:
    """({layer: (scales, zeros)}, {layer: rounded weight}, seconds) of ``rounder`` (``rtn``: none, {},
    0; ``signround``, ``gptq`` or ``gptq-signround``, its mini-batches drawn with ``seed``) on the calibration batch,
    from the cache when there."""
    if rounder == "rtn":  # QAT's own start: the float weights, min-max step sizes and zeros
        return None, {}, 0.0
    path = os.path.join(bench.args.out, f"start-{rounder}.pt")
    key = [plan.n_bytes(), plan.group_size, sorted(plan.bits), steps, list(bench.batch.shape)]
    key += [seed] if seed else []  # caches made before seeds were recorded are seed 0's
    if os.path.exists(path):
        d = torch.load(path)
        if d.get("key") != key:
            raise SystemExit(f"finalize_chain: {path} was made for another plan or settings; use another --out")
        return d["qparams"], d["weights"], d["seconds"]
    init, _, method = rounder.rpartition("-")
    config = FinalizeConfig(method=method, init=init or "rtn", signround_steps=steps, seed=seed, show_progress=False)
    m = bench.fresh()
    t0 = time.time()
    qparams = get_finalizer(method).round(m, plan, bench.batch, config, show_progress=False)
    secs = time.time() - t0
    weights = {n: m.get_submodule(n).weight.detach().clone() for n in plan.bits}
    qparams = {n: (s.cpu(), z.cpu()) for n, (s, z) in qparams.items()}
    tmp = path + ".tmp"
    torch.save({"qparams": qparams, "weights": weights, "seconds": secs, "key": key}, tmp)
    os.replace(tmp, path)
    return qparams, weights, secs


def chain_model(bench: Bench, plan, qparams: dict, weights: dict, chain: str, seed: int):
    """The float model with the rounded weights, trained on by ``chain`` and packed; (model, info)."""
    m = bench.fresh()
    floats = _target_weights(bench.float_model, list(plan.bits))
    with torch.no_grad():
        for n, w in weights.items():
            m.get_submodule(n).weight.copy_(w)
    if chain == "none":
        pack_model(m, plan, qparams)
        return m, {}
    mode, steps, lr, *rest = chain.split(":")
    trainable = rest.pop() if rest and rest[-1] in TRAINABLE else "all"
    qparam_lr = float(rest[0]) if rest else None
    settings = QatSettings(
        mode=mode, steps=int(steps), lr=float(lr), qparam_lr=qparam_lr, batch_size=8, seed=seed, trainable=trainable
    )
    info = finalize_qat(m, plan, bench.batch, settings, show_progress=False, init_qparams=qparams, float_weights=floats)
    convert(m, plan)
    return m, {"qat_seconds": info["seconds"], "first_loss": info["first_loss"], "last_loss": info["last_loss"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "slm-llama-17m"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "data", "corpus", "heldout.txt"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "corpus", "wikitext2_test.txt"))
    ap.add_argument("--config", default="3,128", help="WIDTH,GROUP of the uniform plan")
    ap.add_argument("--plan-file", default=None, help="finalize this plan instead of a uniform one")
    ap.add_argument("--rounder", default="signround", choices=["rtn", "signround", "gptq", "gptq-signround"])
    ap.add_argument("--signround-steps", type=int, default=200)
    ap.add_argument("--chains", default="none,e2e:200:1e-4")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="evaluation tokens (0: the whole text)")
    ap.add_argument("--kl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0, help="seeds the rounder's and the chains' mini-batches")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(os.path.join(a.out, "points"), exist_ok=True)
    args = SimpleNamespace(
        model=a.model,
        calib=a.calib,
        eval_text=a.eval_text,
        samples=a.samples,
        seq_len=a.seq_len,
        max_tokens=a.max_tokens or None,
        kl_tokens=a.kl_tokens,
        device="cpu",
        dtype="float32",
        no_eval_kl=False,
        seed=a.seed,
        out=a.out,
    )
    bench = Bench(args)
    ref = float_point(bench)
    if a.plan_file:
        plan = BitPlan.load(a.plan_file)
        config = f"{os.path.basename(a.plan_file)}, {8 * plan.n_bytes() / bench.n_weights:.3f} bits"
    else:
        width, group = (int(x) for x in a.config.split(","))
        plan = uniform_plan(bench.float_model, width, group)
        config = f"W{width} g{group}"
    qparams, weights, start_secs = start(bench, plan, a.rounder, a.signround_steps, a.seed)
    rows = []
    for chain in a.chains.split(","):
        path = os.path.join(a.out, "points", f"{a.rounder}+{chain.replace(':', '_')}.json")
        if os.path.exists(path):
            row = json.load(open(path))
        else:
            t0 = time.time()
            model, info = chain_model(bench, plan, qparams, weights, chain, a.seed)
            secs = time.time() - t0
            row = {
                "rounder": a.rounder,
                "chain": chain,
                "config": config,
                "bytes": plan.n_bytes(),
                "rounding_seconds": round(start_secs, 1),
                "chain_seconds": round(secs, 1),
                **info,
                **measure(bench, model),
            }
            write_text_atomic(path, json.dumps(row, indent=1) + "\n")
        rows.append(row)
        print(json.dumps(row), flush=True)
    done = {r["chain"] for r in rows}  # the table also lists the chains earlier runs left in --out
    for path in sorted(glob.glob(os.path.join(a.out, "points", f"{a.rounder}+*.json"))):
        row = json.load(open(path))
        if row["chain"] not in done:
            rows.append(row)
    lines = [
        f"float: perplexity {ref['ppl']:.2f}",
        "",
        "| rounding | then | perplexity | held-out KL | evaluation-text KL | chain seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rounder']} ({r['config']}) | {r['chain']} | {r['ppl']:.2f} | {r['kl']:.5f} | "
            f"{r['eval_kl']:.5f} | {r['chain_seconds']:.0f} |"
        )
    write_text_atomic(os.path.join(a.out, "chain.md"), "\n".join(lines) + "\n")
    write_text_atomic(
        os.path.join(a.out, "chain.json"), json.dumps({"args": vars(a), "float": ref, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
