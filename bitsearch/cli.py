"""The ``bitsearch`` command: argument parsing and printing only (every subcommand calls a
function of :mod:`bitsearch.api` or :mod:`bitsearch.demo` whose keywords mirror its flags)."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import BitsearchError

__all__ = ["main", "build_parser"]


def _add_model(p: argparse.ArgumentParser, what: str = "HF hub id or local model folder") -> None:
    p.add_argument("--model", required=True, help=what)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None, help="calibration text file, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--samples", type=int, default=128, help="calibration samples N (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample L (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows (default: 0)")
    p.add_argument("--data-free", type=int, default=None, metavar="N",
                   help="no calibration text: generate N samples of --seq-len tokens with the float model (random "
                        "first token, 3 greedy, then sampled), cached next to --out")
    p.add_argument("--data-free-cache", default=None, metavar="PATH",
                   help="data-free cache file (default: datafree-<model digest>-s<seed>.pt next to --out)")
    p.add_argument("--overwrite-data-free", action="store_true",
                   help="regenerate a data-free cache made with another model or settings instead of refusing it")


def _data_free_args(args: argparse.Namespace) -> dict:
    return {"data_free": args.data_free, "data_free_cache": args.data_free_cache,
            "overwrite_data_free": args.overwrite_data_free}


def _add_sensitivity(p: argparse.ArgumentParser) -> None:
    from .sensitivity import CALIBRATIONS, ESTIMATORS

    p.add_argument("--estimators", default="imatrix",
                   help=f"comma-separated estimators ({', '.join(sorted(ESTIMATORS))}; default: imatrix)")
    p.add_argument("--mix", default=None,
                   help="weights of the estimators' curves, e.g. imatrix=0.7,fisher=0.3 (default: equal weights)")
    p.add_argument("--bits", default=None, help="bit menu, comma-separated (default: 0,2,3,4,5,6,8; 0 = pruned, 16 = keep)")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale/zero along the input dim; -1 = whole channel (default: 128)")
    p.add_argument("--targets", default=None, help="regex of target module names (default: every nn.Linear in the decoder blocks)")
    p.add_argument("--exclude", default=None, help="regex of module names to leave in full precision")
    p.add_argument("--calibrate", default="auto", choices=CALIBRATIONS,
                   help="map curves to loss units per layer by measured loss responses: auto = the proxies "
                        "(imatrix, snr), layer-loss = every estimator, none = raw curves (default: auto)")
    p.add_argument("--calib-loss-samples", type=int, default=16,
                   help="calibration samples used to measure each layer's loss response (default: 16)")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probe rounds (default: 8)")
    p.add_argument("--micro-batch", type=int, default=8, help="calibration samples per forward pass (default: 8)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing for the gradient estimators (less memory, more time)")


def build_parser() -> argparse.ArgumentParser:
    from .search import ALLOCATORS

    ap = argparse.ArgumentParser(prog="bitsearch", description="Per-channel bit-width search for LLM quantization "
                                 "under a memory budget (0 bits = pruned).")
    ap.add_argument("--version", action="version", version=f"bitsearch {__version__}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)   # --quiet also after the command
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    p = sub.add_parser("demo", parents=[quiet], help="run the whole pipeline on the bundled small model, offline")
    p.add_argument("--out", required=True, help="output folder for plans, results.csv and the plot")
    p.add_argument("--budgets", default="2.5,3.0,3.5", help="avg-bit budgets to search (default: 2.5,3.0,3.5)")

    p = sub.add_parser("sensitivity", parents=[quiet], help="per-channel error curves -> Parquet table")
    _add_model(p)
    _add_calib(p)
    _add_sensitivity(p)
    p.add_argument("--offload", action="store_true",
                   help="keep decoder blocks on the CPU and move one at a time to --device (imatrix, snr)")
    p.add_argument("--imatrix", default=None,
                   help="a llama.cpp imatrix file (GGUF or legacy .dat) used as the importance matrix (imatrix only)")
    p.add_argument("--out", required=True, help="output table (.parquet)")

    p = sub.add_parser("search", parents=[quiet], help="a bit plan under a memory budget -> plan JSON")
    _add_model(p)
    _add_calib(p)
    _add_sensitivity(p)
    p.add_argument("--budget", required=True, help="avg bits all-in (e.g. 2.5) or target bytes (12MB, 12MiB)")
    p.add_argument("--sensitivity", default=None, help="precomputed sensitivity table (.parquet); else computed from --calib")
    p.add_argument("--method", default="greedy", choices=sorted(ALLOCATORS) + ["optuna", "diffq"],
                   help="greedy | ilp (exact) | snr (water-filling) | uniform | optuna (measured KL, Pareto front) | "
                        "diffq (trained widths, noise injection) (default: greedy)")
    i = p.add_argument_group("--method ilp")
    i.add_argument("--granularity", default="channel", help="channel | group:K | layer: channels sharing one width (default: channel)")
    i.add_argument("--share", action="append", default=None, metavar="REGEX",
                   help=r"layers sharing one width, grouped by the regex's capture group, e.g. '^(.*)\.self_attn\.[qkv]_proj$' (repeatable)")
    i.add_argument("--layer-min-bits", action="append", default=None, metavar="REGEX=WIDTH",
                   help="smallest width for layers matching REGEX, e.g. down_proj=3 (repeatable)")
    i.add_argument("--time-limit", type=float, default=None, help="seconds; returns the best plan found with its gap")
    p.add_argument("--min-bits", type=int, default=2,
                   help="smallest width allowed (default: 2; 0 allows pruning, which the imatrix estimate "
                        "still under-prices: see the README)")
    p.add_argument("--max-bits", type=int, default=None, help="largest width allowed")
    p.add_argument("--no-coupling", action="store_true",
                   help="with --min-bits 0: prune rows one by one instead of whole MLP channels and key-value "
                        "head groups (which also free down_proj / o_proj columns)")
    o = p.add_argument_group("--method optuna")
    o.add_argument("--n-trials", type=int, default=50, help="trials to run (with --resume: the total wanted) (default: 50)")
    o.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    o.add_argument("--sampler", default="nsga2", help="nsga2 | tpe (seeded by --seed) (default: nsga2)")
    o.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file or a database URL (default: OUT.optuna.journal next to the plan)")
    o.add_argument("--study-name", default=None, help="study name (default: from the model and budget)")
    o.add_argument("--resume", action="store_true", help="continue an existing study (several workers: all pass it)")
    o.add_argument("--span", type=float, default=0.25, help="trials also try budgets down to budget - span avg bits (default: 0.25)")
    o.add_argument("--kl-samples", type=int, default=48,
                   help="calibration samples on which optuna measures KL and diffq trains; as many more, held out, "
                        "choose among the candidates (default: 48; 16 were too few on slm-llama-17m: README)")
    d = p.add_argument_group("--method diffq")
    d.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    d.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the width logits (default: 0.05)")
    d.add_argument("--relax", default="rtn", choices=["rtn", "noise"],
                   help="training forward: the round-to-nearest weights of the two menu widths around each "
                        "channel's width, interpolated, or pseudo-quantization noise of the width's step "
                        "(default: rtn)")
    d.add_argument("--learn", default="channel", choices=["channel", "layer"],
                   help="train a width per channel, or one shift per layer on top of the estimator's widths "
                        "(fewer parameters to fit from few samples) (default: channel)")
    g = p.add_argument_group("--format gguf")
    g.add_argument("--format", default="channel", choices=["channel", "gguf"],
                   help="channel: a width per channel (bitsearch's packed format); gguf: a ggml type per tensor "
                        "for llama.cpp, scored by llama.cpp's own quantizers (default: channel)")
    g.add_argument("--types", default=None, help="ggml type menu, comma-separated (default: IQ2_XXS,IQ2_XS,IQ2_S,"
                   "Q2_K,IQ3_XXS,Q3_K,IQ3_S,IQ4_XS,Q4_K,Q5_K,Q6_K,Q8_0)")
    g.add_argument("--ref-type", default="Q2_K", help="type whose measured loss response calibrates each tensor "
                   "(default: Q2_K)")
    g.add_argument("--imatrix", default=None, help="score with this llama.cpp imatrix file instead of collecting one")
    p.add_argument("--out", required=True, help="output plan (.json)")

    p = sub.add_parser("export", parents=[quiet], help="plan + model -> a runtime's files (gguf: llama.cpp)")
    _add_model(p)
    p.add_argument("--plan", required=True, help="plan file (for gguf: from `bitsearch search --format gguf`)")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    p.add_argument("--out", required=True, help="output file (model.gguf; also writes .tensor-types.txt and "
                   ".imatrix.gguf beside it)")

    p = sub.add_parser("finalize", parents=[quiet],
                       help="plan + model -> packed checkpoint after QAT (or SignRound) on calibration or data-free text")
    _add_model(p)
    p.add_argument("--plan", required=True, help="plan file from `bitsearch search`")
    _add_calib(p)
    p.add_argument("--method", default="qat", choices=["qat", "signround"],
                   help="qat (trained weights, step sizes, zeros) | signround (learned rounding only) (default: qat)")
    p.add_argument("--init", default="rtn", choices=["rtn", "signround"],
                   help="QAT starts from round-to-nearest or from SignRound's rounding (default: rtn)")
    p.add_argument("--mode", default="tiled", choices=["e2e", "tiled", "tiled+e2e"],
                   help="forward-tiled block training, e2e distillation, or tiled then a short e2e pass "
                        "(default: tiled, the best in the README's study)")
    p.add_argument("--round", dest="round_mode", default="ste", choices=["ste", "sigmoid"],
                   help="rounding gradient: straight-through or Sigmoid STE (default: ste)")
    p.add_argument("--temperature", type=float, default=0.0, help="Sigmoid STE temperature T; 0 = STE (default: 0)")
    p.add_argument("--anneal", action="store_true", help="raise T linearly from 0 to --temperature over training")
    p.add_argument("--clamp", dest="clamp_mode", default="hard", choices=["hard", "soft"],
                   help="clamping gradient: hard or SoftClamp (default: hard)")
    p.add_argument("--beta", type=float, default=1.0, help="SoftClamp gate sharpness (default: 1, the paper's)")
    p.add_argument("--soft-warmup", type=int, default=0, help="first N steps use the surrogates in the forward too")
    p.add_argument("--steps", type=int, default=200, help="training steps (tiled: per tile) (default: 200)")
    p.add_argument("--e2e-steps", type=int, default=None, help="steps of the e2e pass after tiles (default: steps/2)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the weights (default: 1e-4)")
    p.add_argument("--qparam-lr", type=float, default=None, help="learning rate of step sizes and zeros (default: --lr)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (default: 8)")
    p.add_argument("--tile-size", type=int, default=3, help="decoder blocks per tile (default: 3)")
    p.add_argument("--tile-loss", default="l2", choices=["l2", "l1"], help="tile output loss (default: l2)")
    p.add_argument("--no-tile-guard", dest="tile_guard", action="store_false",
                   help="keep a tile's trained parameters even when training made its loss worse "
                        "(default: keep the initial ones then)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="add this x cross-entropy to the e2e KL (default: 0)")
    p.add_argument("--signround-steps", type=int, default=200, help="SignRound steps per block (default: 200)")
    p.add_argument("--signround-lr", type=float, default=None, help="SignRound learning rate (default: 1/steps)")
    p.add_argument("--checkpoint-every", type=float, default=300.0,
                   help="seconds between QAT checkpoints OUT.qat-checkpoint.pt (default: 300)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.qat-checkpoint.pt")
    p.add_argument("--out", required=True, help="output folder (packed checkpoint)")

    p = sub.add_parser("pareto", parents=[quiet], help="list an optuna search study's trials and front; export a point")
    p.add_argument("--storage", required=True, help="the study's journal file or database URL")
    p.add_argument("--study-name", default=None, help="study name (default: the only one in the storage)")
    p.add_argument("--csv", default=None, help="also write every trial to this CSV")
    p.add_argument("--export", type=int, default=None, help="write the plan of this trial number to --out")
    p.add_argument("--out", default=None, help="plan file for --export")

    p = sub.add_parser("apply", parents=[quiet], help="plan + model -> packed checkpoint (or --fake HF checkpoint)")
    _add_model(p)
    p.add_argument("--plan", required=True, help="plan file from `bitsearch search`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fake", action="store_true", help="write a plain HF checkpoint of dequantized weights")

    p = sub.add_parser("plot", parents=[quiet], help="figures: plot sensitivity|plan ... --out P.png")
    kinds = p.add_subparsers(dest="plot", required=True, metavar="WHAT")
    q = kinds.add_parser("sensitivity", help="heatmap per block and layer type, spread per type, SNR vs bits")
    q.add_argument("--table", required=True, help="sensitivity table (.parquet)")
    q.add_argument("--out", required=True, help="output image (.png)")
    q.add_argument("--estimator", default=None, help="estimator whose curves to show (default: the table's first)")
    q.add_argument("--width", type=int, default=None, help="reference width for the error panels (default: 2)")
    q = kinds.add_parser("pareto", help="an optuna study's trials, front, budget (and uniform RTN points)")
    q.add_argument("--storage", required=True, help="the study's journal file or database URL")
    q.add_argument("--study-name", default=None, help="study name (default: the only one in the storage)")
    q.add_argument("--out", required=True, help="output image (.png)")
    q.add_argument("--model", default=None, help="with --calib: also measure uniform RTN points on this model")
    q.add_argument("--calib", default=None, help="calibration text for the uniform points' KL")
    q.add_argument("--kl-samples", type=int, default=48,
                   help="calibration samples for that KL; use the study's --kl-samples (default: 48)")
    q = kinds.add_parser("plan", help="width of every channel per layer, width mix per layer type, bits per block")
    q.add_argument("--plan", required=True, help="plan file (.json)")
    q.add_argument("--out", required=True, help="output image (.png)")
    q.add_argument("--title", default=None, help="a title line to add")

    p = sub.add_parser("eval", parents=[quiet], help="perplexity of a model or packed checkpoint on a text file")
    _add_model(p, "HF hub id, local model folder, packed checkpoint folder or GGUF file (.gguf)")
    p.add_argument("--text", required=True, help="text file to evaluate on")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: 512)")
    p.add_argument("--json", default=None, help="write {ppl, nll, entropy, tokens, seq_len, model[, kl]} to this file")
    p.add_argument("--reference", default=None, help="reference model: also report KL(reference || model)")
    return ap


def _run(args: argparse.Namespace) -> int:
    from . import api

    show = not args.quiet
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, budgets=args.budgets, show_progress=show)
    elif args.command == "sensitivity":
        table = api.sensitivity(model=args.model, calib=args.calib, out=args.out, samples=args.samples,
                                seq_len=args.seq_len, seed=args.seed, estimators=args.estimators, bits=args.bits,
                                group_size=args.group_size, targets=args.targets, exclude=args.exclude,
                                calibrate=args.calibrate, calib_loss_samples=args.calib_loss_samples,
                                mix=args.mix, probes=args.probes, offload=args.offload,
                                checkpointing=args.checkpointing, micro_batch=args.micro_batch,
                                device=args.device, dtype=args.dtype, show_progress=show, imatrix=args.imatrix,
                                **_data_free_args(args))
        if table.meta["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
            secs = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in table.meta["estimator_info"].items())
            print(f"wrote {args.out}: {len(table.df)} channels in {len(table.layers)} layers, "
                  f"widths {','.join(map(str, table.bits))}, group size {table.group_size}, "
                  f"estimators {secs}; {table.meta['units']}")
            hutch = table.meta["estimator_info"].get("hutchinson", {})
            if "layer_rel_se_median" in hutch:
                print(f"hutchinson: standard error of a layer's trace, median {100 * hutch['layer_rel_se_median']:.1f} %, "
                      f"worst {100 * hutch['layer_rel_se_max']:.1f} % of the trace (more --probes lower it)")
    elif args.command == "search" and args.format == "gguf":
        plan = api.search_gguf(model=args.model, budget=args.budget, out=args.out, calib=args.calib,
                               samples=args.samples, seq_len=args.seq_len, seed=args.seed, types=args.types,
                               method=args.method, ref_type=args.ref_type, calib_loss_samples=args.calib_loss_samples,
                               micro_batch=args.micro_batch, imatrix=args.imatrix, device=args.device,
                               dtype=args.dtype, show_progress=show)
        s = plan.summary
        print(f"wrote {args.out}: {s['avg_bits']:.4f} bits per weight, {s['bytes']} bytes of tensor data, "
              f"types {s['histogram']}, predicted loss increase {s['predicted_error']:.4g}")
    elif args.command == "export":
        info = api.export(model=args.model, plan=args.plan, out=args.out, format=args.format, device=args.device,
                          dtype=args.dtype)
        print(f"wrote {args.out}: {info['file_bytes']} bytes ({info['tensor_bytes']} bytes of planned tensor data, "
              f"plan: {info['plan_bytes']}); {info['tensor_type_file']}"
              + (f"; {info['imatrix']}" if info.get("imatrix") else ""))
    elif args.command == "search":
        if args.imatrix or args.types:
            raise BitsearchError("--imatrix and --types need --format gguf")
        plan = api.search(model=args.model, budget=args.budget, out=args.out, calib=args.calib,
                          sensitivity_table=args.sensitivity, method=args.method, bits=args.bits,
                          group_size=args.group_size, min_bits=args.min_bits, max_bits=args.max_bits,
                          samples=args.samples, seq_len=args.seq_len, seed=args.seed, estimators=args.estimators,
                          targets=args.targets, exclude=args.exclude, calibrate=args.calibrate,
                          calib_loss_samples=args.calib_loss_samples, mix=args.mix, probes=args.probes,
                          checkpointing=args.checkpointing, micro_batch=args.micro_batch, device=args.device,
                          dtype=args.dtype, n_trials=args.n_trials, timeout=args.timeout, sampler=args.sampler,
                          storage=args.storage, study_name=args.study_name, resume=args.resume, span=args.span,
                          kl_samples=args.kl_samples, steps=args.steps, lr=args.lr, learn=args.learn, relax=args.relax,
                          granularity=args.granularity,
                          share=args.share, layer_min_bits=args.layer_min_bits, time_limit=args.time_limit,
                          coupling=not args.no_coupling, show_progress=show, **_data_free_args(args))
        s = plan.summary
        dead = f" ({s['dead_units']} whole units: smaller matrices)" if s.get("dead_units") else ""
        print(f"wrote {args.out}: {s['avg_bits']:.4f} avg bits, {s['bytes']} bytes, "
              f"{s['pruned_channels']} of {s['n_channels']} channels pruned{dead}, widths {s['histogram']}, "
              f"predicted loss increase {s['predicted_error']:.4g}")
    elif args.command == "pareto":
        rows, plan = api.pareto(storage=args.storage, study_name=args.study_name, export=args.export, out=args.out,
                                csv=args.csv)
        print(f"{'trial':>6} {'avg bits':>9} {'bytes':>11} {'KL':>10}  front  in budget")
        for r in rows:
            print(f"{r['trial']:>6} {r['avg_bits']:>9.4f} {r['bytes']:>11} {r['kl']:>10.5f}  "
                  f"{'*' if r['on_front'] else ' ':^5}  {'yes' if r['within_budget'] else 'no'}")
        if plan is not None:
            print(f"wrote {args.out}: trial {args.export}, {plan.summary['avg_bits']:.4f} avg bits")
    elif args.command == "finalize":
        keys = ("plan", "calib", "method", "init", "mode", "round_mode", "temperature", "anneal", "clamp_mode", "beta",
                "soft_warmup", "steps", "e2e_steps", "lr", "qparam_lr", "batch_size", "tile_size", "tile_loss",
                "tile_guard", "ce_weight", "samples", "seq_len", "seed", "signround_steps", "signround_lr", "resume",
                "checkpoint_every", "device", "dtype", "out")
        info = api.finalize(model=args.model, show_progress=show, **{k: getattr(args, k) for k in keys},
                            **_data_free_args(args))
        qat = info.get("qat") or {}
        last = (qat.get("last_loss") or {})
        losses = ", ".join(f"{k} loss {v:.4g}" for k, v in last.items() if v is not None)
        print(f"wrote {args.out}: {info['written_bytes']} bytes of packed target tensors (plan: {info['plan_bytes']}), "
              f"{info['method']}{' ' + losses if losses else ''}, {info['seconds']:.1f} s")
    elif args.command == "apply":
        info = api.apply(model=args.model, plan=args.plan, out=args.out, fake=args.fake, device=args.device,
                         dtype=args.dtype)
        if args.fake:
            print(f"wrote {args.out}: HF checkpoint with dequantized target weights")
        else:
            print(f"wrote {args.out}: {info['written_bytes']} bytes of packed target tensors "
                  f"(plan: {info['plan_bytes']}), {info['avg_bits']:.4f} avg bits")
    elif args.command == "plot":
        if args.plot == "plan":
            path = api.plot_plan(plan=args.plan, out=args.out, title=args.title)
        elif args.plot == "pareto":
            path = api.plot_pareto(storage=args.storage, study_name=args.study_name, out=args.out, model=args.model,
                                   calib=args.calib, kl_samples=args.kl_samples)
        else:
            path = api.plot_sensitivity(table=args.table, out=args.out, estimator=args.estimator, width=args.width)
        print(f"wrote {path}")
    elif args.command == "eval":
        r = api.evaluate(model=args.model, text=args.text, max_tokens=args.max_tokens, seq_len=args.seq_len,
                         json_out=args.json, reference=args.reference, device=args.device, dtype=args.dtype,
                         show_progress=show)
        line = f"ppl {r.ppl:.3f}  nll {r.nll:.4f}  entropy {r.entropy:.4f}  tokens {r.tokens}  seq_len {r.seq_len}"
        if r.kl is not None:
            line += f"  KL(ref||model) {r.kl:.5f}"
        print(line)
    return 0


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' (one-line errors stay one line)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return _run(args)
    except BitsearchError as exc:
        print(f"bitsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitsearch: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
