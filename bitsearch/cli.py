"""The ``bitsearch`` command: parsing and printing only. Each subcommand's flags are generated from
its config dataclass (``bitsearch.config``) plus the command's inputs and outputs (``--model``,
``--calib``, ``--out``, ...), and it calls one function of the Python API with them.

Only the chosen subcommand's flags are built (their choices come from the registries, which import
torch), so ``bitsearch --help`` and ``bitsearch --version`` return at once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .errors import BitsearchError

__all__ = ["main", "build_parser", "COMMANDS"]


@dataclass
class Input:
    """A flag naming a command's input or output (not an option of the computation)."""

    flag: str
    help: str
    required: bool = False
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    name: str | None = None  # the API's name for it, when not the flag's (--sensitivity: table)
    switch: bool = False  # a flag without a value (store_true)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class Command:
    name: str
    help: str
    config: str | None  # the config class's name in bitsearch.config
    inputs: list[Input]
    run: Callable  # run(args, config) -> None (prints what was made)
    required: tuple[str, ...] = ()  # config fields the command line must give
    sub: list["Command"] = field(default_factory=list)  # e.g. plot sensitivity|plan|pareto


MODEL = Input("--model", "HF hub id or local model folder", required=True)
CALIB = Input("--calib", "calibration text file, or hf:NAME[:CONFIG]:SPLIT")


def _run_demo(args, config):
    from .demo import run_demo

    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    run_demo(out=args.out, budgets=config.budgets, show_progress=not args.quiet)


def _run_sensitivity(args, config):
    from . import api

    table = api.sensitivity(
        args.model, args.calib, config, out=args.out, overwrite=args.overwrite, imatrix=args.imatrix
    )
    if table.meta["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
        secs = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in table.meta["estimator_info"].items())
        print(
            f"wrote {args.out}: {len(table.df)} channels in {len(table.layers)} layers, "
            f"widths {','.join(map(str, table.bits))}, group size {table.group_size}, "
            f"estimators {secs}; {table.meta['units']}"
        )
        hutch = table.meta["estimator_info"].get("hutchinson", {})
        if "layer_rel_se_median" in hutch:
            print(
                f"hutchinson: standard error of a layer's trace, median {100 * hutch['layer_rel_se_median']:.1f} %, "
                f"worst {100 * hutch['layer_rel_se_max']:.1f} % of the trace (more --probes lower it)"
            )


def _run_search(args, config):
    from . import api

    plan = api.search(
        args.model,
        args.calib,
        config,
        table=args.sensitivity,
        out=args.out,
        overwrite=args.overwrite,
        imatrix=args.imatrix,
    )
    s = plan.summary
    if config.format == "gguf":
        print(
            f"wrote {args.out}: {s['avg_bits']:.4f} bits per weight, {s['bytes']} bytes of tensor data, "
            f"types {s['histogram']}, predicted loss increase {s['predicted_error']:.4g}"
        )
        return
    dead = f" ({s['dead_units']} whole units: smaller matrices)" if s.get("dead_units") else ""
    print(
        f"wrote {args.out}: {s['avg_bits']:.4f} avg bits, {s['bytes']} bytes, "
        f"{s['pruned_channels']} of {s['n_channels']} channels pruned{dead}, widths {s['histogram']}, "
        f"predicted loss increase {s['predicted_error']:.4g}"
    )
    if "format" in s:
        print(f"in {s['format']['name']}: {s['format']['bytes']} bytes, {s['format']['avg_bits']:.4f} avg bits")


def _run_finalize(args, config):
    from . import api
    from .io.checkpoint import packed_tensor_bytes

    m = api.finalize(
        args.model, args.plan, args.calib, config, out=args.out, overwrite=args.overwrite, force=args.force
    )
    info = m.bitsearch_plan.provenance["finalize"]
    last = (info.get("qat") or {}).get("last_loss") or {}
    losses = ", ".join(f"{k} loss {v:.4g}" for k, v in last.items() if v is not None)
    method = info["method"]
    if "qat" in info:
        trained = "step sizes" if info["qat"]["settings"]["trainable"] == "scales" else "weights"
        method = f"{info['init']} then qat {info['qat']['mode']} ({trained})"
    print(
        f"wrote {args.out}: {packed_tensor_bytes(args.out)} bytes of packed target tensors "
        f"(plan: {m.bitsearch_plan.n_bytes()}), {method}{' ' + losses if losses else ''}, "
        f"{info['seconds']:.1f} s"
    )


def _run_apply(args, config):
    from . import api
    from .io.checkpoint import packed_tensor_bytes

    m = api.apply(args.model, args.plan, config, out=args.out, overwrite=args.overwrite, force=args.force)
    p = m.bitsearch_plan
    if config.fake:
        print(f"wrote {args.out}: HF checkpoint with dequantized target weights")
    else:
        print(
            f"wrote {args.out}: {packed_tensor_bytes(args.out)} bytes of packed target tensors "
            f"(plan: {p.n_bytes()}), {p.summary.get('avg_bits', 0):.4f} avg bits"
        )


def _run_export(args, config):
    from . import api

    info = api.export(args.model, args.plan, args.out, config, overwrite=args.overwrite, force=args.force)
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k != "out")
    print(f"wrote {args.out} ({config.format}){': ' + extra if extra else ''}")


def _run_eval(args, config):
    from . import api

    r = api.evaluate(args.model, args.text, config, reference=args.reference, out=args.json, overwrite=args.overwrite)
    line = f"ppl {r.ppl:.3f}  nll {r.nll:.4f}  entropy {r.entropy:.4f}  tokens {r.tokens}  seq_len {r.seq_len}"
    if r.kl is not None:
        line += f"  KL(ref||model) {r.kl:.5f}"
    print(line)


def _run_generate(args, config):
    from .generate import generate

    r = generate(args.model, args.prompt, config)
    print(args.prompt + r.text)
    t = r.timing
    print(
        f"{len(t.tokens)} new tokens; prompt {r.prompt_tokens} tokens in {t.prefill_seconds:.3f} s; "
        f"decoding {r.tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )


def _run_pareto(args, config):
    from .outputs import check_output
    from .search.optuna_study import study_trials

    if config.export is not None and args.out is None:
        raise BitsearchError("--export needs --out PLAN.json")
    check_output(args.out, "file", inputs=(args.storage,), overwrite=args.overwrite, what="plan")
    check_output(config.csv, "file", inputs=(args.storage,), overwrite=args.overwrite, what="trials table")
    rows, plan = study_trials(args.storage, config.study_name, config.export)
    if config.csv:
        import pandas as pd

        from .atomic import write_text_atomic

        write_text_atomic(config.csv, pd.DataFrame(rows).to_csv(index=False))
    print(f"{'trial':>6} {'avg bits':>9} {'bytes':>11} {'KL':>10}  front  in budget")
    for r in rows:
        print(
            f"{r['trial']:>6} {r['avg_bits']:>9.4f} {r['bytes']:>11} {r['kl']:>10.5f}  "
            f"{'*' if r['on_front'] else ' ':^5}  {'yes' if r['within_budget'] else 'no'}"
        )
    if plan is not None:
        plan.save(args.out)
        print(f"wrote {args.out}: trial {config.export}, {plan.summary['avg_bits']:.4f} avg bits")


def _check_png(args, *inputs):
    from .outputs import check_output

    check_output(args.out, "file", inputs=inputs, overwrite=args.overwrite, what="image")


def _run_plot_sensitivity(args, config):
    _check_png(args, args.table)
    from .plots import plot_sensitivity
    from .sensitivity import SensitivityTable

    table = SensitivityTable.load(args.table)
    print(f"wrote {plot_sensitivity(table, args.out, estimator=config.estimator, width=config.width)}")


def _run_plot_plan(args, config):
    _check_png(args, args.plan)
    from .io.plan import BitPlan
    from .plots import plot_plan

    print(f"wrote {plot_plan(BitPlan.load(args.plan), args.out, title=config.title)}")


def _run_plot_pareto(args, config):
    _check_png(args, args.storage, args.model, args.calib)
    from .plots import pareto_figure

    print(f"wrote {pareto_figure(args.storage, args.out, config.study_name, args.model, args.calib, config)}")


OUT_DIR = Input("--out", "output folder", required=True)
OVERWRITE = Input("--overwrite", "replace an existing output (never one of the command's inputs)", switch=True)
FORCE = Input("--force", "use a plan made for a model of the same shapes but other weights", switch=True)
PLAN = Input("--plan", "plan file from `bitsearch search`", required=True)
PNG = Input("--out", "output image (.png)", required=True)
IMATRIX = Input(
    "--imatrix",
    "a llama.cpp imatrix file (GGUF or legacy .dat) used as the importance matrix "
    "instead of collecting one (imatrix estimator; search: format gguf)",
)

COMMANDS = [
    Command(
        "demo",
        "run the whole pipeline on the bundled small model, offline",
        "DemoConfig",
        [Input("--out", "output folder for plans, results.csv and the plot", required=True)],
        _run_demo,
    ),
    Command(
        "sensitivity",
        "per-channel error curves -> Parquet table",
        "SensitivityConfig",
        [MODEL, CALIB, Input("--out", "output table (.parquet)", required=True), IMATRIX, OVERWRITE],
        _run_sensitivity,
    ),
    Command(
        "search",
        "a bit plan under a memory budget -> plan JSON",
        "SearchConfig",
        [
            MODEL,
            CALIB,
            Input(
                "--sensitivity",
                "precomputed sensitivity table (.parquet); else computed from --calib",
                aliases=("--table",),
                name="table",
            ),
            Input("--out", "output plan (.json)", required=True),
            IMATRIX,
            OVERWRITE,
        ],
        _run_search,
        required=("budget",),
    ),
    Command(
        "finalize",
        "plan + model -> packed checkpoint after QAT (or SignRound) on calibration or data-free text",
        "FinalizeConfig",
        [MODEL, PLAN, CALIB, Input("--out", "output folder (packed checkpoint)", required=True), OVERWRITE, FORCE],
        _run_finalize,
    ),
    Command(
        "pareto",
        "list an optuna search study's trials and front; export a point",
        "ParetoConfig",
        [
            Input("--storage", "the study's journal file or database URL", required=True),
            Input("--out", "plan file for --export"),
            OVERWRITE,
        ],
        _run_pareto,
    ),
    Command(
        "apply",
        "plan + model -> packed checkpoint (or --fake HF checkpoint)",
        "ApplyConfig",
        [MODEL, PLAN, OUT_DIR, OVERWRITE, FORCE],
        _run_apply,
    ),
    Command(
        "export",
        "plan + model -> the files of a runtime (--format)",
        "ExportConfig",
        [MODEL, PLAN, Input("--out", "output file or folder", required=True), OVERWRITE, FORCE],
        _run_export,
    ),
    Command(
        "plot",
        "figures: plot sensitivity|plan|pareto ... --out P.png",
        None,
        [],
        None,
        sub=[
            Command(
                "sensitivity",
                "heatmap per block and layer type, spread per type, SNR vs bits",
                "PlotSensitivityConfig",
                [Input("--table", "sensitivity table (.parquet)", required=True), PNG, OVERWRITE],
                _run_plot_sensitivity,
            ),
            Command(
                "pareto",
                "an optuna study's trials, front, budget (and uniform RTN points)",
                "PlotParetoConfig",
                [
                    Input("--storage", "the study's journal file or database URL", required=True),
                    PNG,
                    Input("--model", "with --calib: also measure uniform RTN points on this model"),
                    Input("--calib", "calibration text for the uniform points' KL"),
                    OVERWRITE,
                ],
                _run_plot_pareto,
            ),
            Command(
                "plan",
                "width of every channel per layer, width mix per layer type, bits per block",
                "PlotPlanConfig",
                [Input("--plan", "plan file (.json)", required=True), PNG, OVERWRITE],
                _run_plot_plan,
            ),
        ],
    ),
    Command(
        "eval",
        "perplexity of a model or packed checkpoint on a text file",
        "EvalConfig",
        [
            Input(
                "--model", "HF hub id, local model folder, packed checkpoint folder or GGUF file (.gguf)", required=True
            ),
            Input("--text", "text file to evaluate on", required=True),
            Input("--json", "write {ppl, nll, entropy, tokens, seq_len, model[, kl]} to this file", name="out"),
            Input("--reference", "reference model: also report KL(reference || model)"),
            OVERWRITE,
        ],
        _run_eval,
    ),
    Command(
        "generate",
        "batch-1 greedy generation from a prompt, with tokens/s",
        "GenerateConfig",
        [
            Input("--model", "HF hub id, local model folder or packed checkpoint folder", required=True),
            Input("--prompt", "the prompt text", required=True),
        ],
        _run_generate,
    ),
]


def _config_class(name: str | None):
    from . import config

    return getattr(config, name) if name else None


def _add_command(sub, cmd: Command, quiet: argparse.ArgumentParser, full: bool) -> None:
    from .options import add_options

    p = sub.add_parser(cmd.name, parents=[quiet], help=cmd.help, description=cmd.help)
    if cmd.sub:
        kinds = p.add_subparsers(dest=f"{cmd.name}_kind", required=True, metavar="WHAT")
        for c in cmd.sub:
            _add_command(kinds, c, quiet, full)
        return
    p.set_defaults(_command=cmd)
    if not full:
        return
    for i in cmd.inputs:
        if i.switch:
            p.add_argument(i.flag, *i.aliases, dest=i.dest, action="store_true", help=i.help)
        else:
            p.add_argument(i.flag, *i.aliases, dest=i.dest, required=i.required, help=i.help, metavar=i.metavar)
    cls = _config_class(cmd.config)
    if cls is not None:
        add_options(p, cls)
        for name in cmd.required:
            action = next(a for a in p._actions if a.dest == name)
            action.required = True


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the flags of the command it names are built (fast ``--help``)."""
    ap = argparse.ArgumentParser(
        prog="bitsearch",
        description="Per-channel bit-width search for LLM quantization under a memory budget (0 bits = pruned).",
    )
    ap.add_argument("--version", action="version", version=f"bitsearch {__version__}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)  # --quiet also after the command
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    words = set(argv) if argv is not None else None
    for cmd in COMMANDS:
        _add_command(sub, cmd, quiet, full=words is None or cmd.name in words)
    return ap


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' (one-line errors stay one line)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _flagify(message: str, cmd: Command, cls) -> str:
    """The library names options by their Python names (``group_size``, or in backquotes for a
    one-word name: ```probes```); on the command line the same message names the flags
    (``--group-size``, ``--probes``). Bare names are rewritten only when they hold an underscore:
    they cannot be ordinary words."""
    import re

    from .options import option_flag

    flags = {i.name or i.dest: i.flag for i in cmd.inputs}
    if cls is not None:
        flags.update({f.name: option_flag(f) for f in cls.__dataclass_fields__.values()})
    for name, flag in flags.items():
        message = message.replace(f"`{name}`", flag)
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){name}(?![\w])", flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    from .options import from_args

    cmd: Command = args._command
    cls = _config_class(cmd.config)
    try:
        _quiet_libraries()
        config = None
        if cls is not None:
            extra = {"show_progress": not args.quiet} if "show_progress" in cls.__dataclass_fields__ else {}
            config = from_args(cls, args, **extra)
        from .inputs import invoked_as

        with invoked_as(" ".join(shlex.quote(a) for a in ["bitsearch"] + argv)):
            cmd.run(args, config)
        return 0
    except BitsearchError as exc:
        print(f"bitsearch: error: {_flagify(str(exc), cmd, cls)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .outputs import kept_on_interrupt

        kept = kept_on_interrupt()
        print(
            f"bitsearch: interrupted: {kept or 'nothing was written'} (no file was left half-written)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
