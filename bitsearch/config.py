"""Every option of every stage, declared once (``options.option``): the Python API takes these
config objects and the command line is generated from them, so a flag, its keyword and its default
cannot drift apart.

    RunConfig            device, dtype, threads                      (every command that runs a model)
    CalibConfig          + calibration windows or data-free samples (sensitivity, search, finalize)
    SensitivityConfig    + estimators, bit menu, group size, targets, loss calibration
    SearchConfig         + budget, method and each method's options
    FinalizeConfig       + finalizer and its training options
    ApplyConfig, EvalConfig, GenerateConfig, ExportConfig, and the small configs of the plotting commands
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import option

DEFAULT_GROUP_SIZE = 128

__all__ = [
    "RunConfig",
    "CalibConfig",
    "SensitivityConfig",
    "SearchConfig",
    "FinalizeConfig",
    "ApplyConfig",
    "EvalConfig",
    "GenerateConfig",
    "ExportConfig",
    "ParetoConfig",
    "PlotSensitivityConfig",
    "PlotPlanConfig",
    "PlotParetoConfig",
    "DemoConfig",
    "KL_SAMPLES",
]

# Calibration samples on which optuna / diffq measure KL (and as many more held out to choose
# among their candidates); 16 were measured too few (docs/search-methods.md).
KL_SAMPLES = 48


def _estimators() -> list[str]:
    from .sensitivity import ESTIMATORS

    return sorted(ESTIMATORS)


def _calibrations() -> list[str]:
    from .sensitivity import CALIBRATIONS

    return list(CALIBRATIONS)


def _search_methods() -> list[str]:
    from .search import ALLOCATORS

    return sorted(ALLOCATORS)


def _finalizers() -> list[str]:
    from .finalize import FINALIZERS

    return sorted(FINALIZERS)


def _starts() -> list[str]:
    from .finalize import rounders

    return ["rtn"] + rounders()


def _formats() -> list[str]:
    from .export import EXPORTERS

    return sorted(EXPORTERS)


@dataclass
class RunConfig:
    device: str = option("cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    dtype: str = option("float32", help="dtype the model is loaded in: float32 | bfloat16 | float16")
    threads: int | None = option(
        None,
        help="CPU threads for torch (default: all cores; on a machine shared with "
        "other jobs 1-2 threads can be several times faster)",
    )
    show_progress: bool = option(True, help="progress bars and lines on stderr", cli=False)


@dataclass
class CalibConfig(RunConfig):
    samples: int = option(128, help="calibration samples N")
    seq_len: int = option(512, help="tokens per calibration sample L")
    seed: int = option(0, help="seed for choosing calibration windows (and of every seeded method)")
    data_free: int | None = option(
        None,
        metavar="N",
        help="no calibration text: generate N samples of seq-len "
        "tokens with the float model (random first token, 3 greedy, then sampled), "
        "cached next to the output",
    )
    data_free_cache: str | None = option(
        None,
        metavar="PATH",
        help="data-free cache file (default: datafree-<model digest>-s<seed>.pt next to the output)",
    )
    overwrite_data_free: bool = option(
        False, help="regenerate a data-free cache made with another model or settings instead of refusing it"
    )
    allow_overlap: bool = option(
        False,
        help="let calibration windows overlap when the text is too short for "
        "samples x seq-len tokens (otherwise refused, saying how many fit)",
    )


@dataclass
class SensitivityConfig(CalibConfig):
    estimators: str = option("imatrix", help="comma-separated estimators", metavar="LIST", choices=None)
    mix: str | None = option(
        None, help="weights of the estimators' curves, e.g. imatrix=0.7,fisher=0.3 (default: equal weights)"
    )
    bits: str | None = option(
        None, help="bit menu, comma-separated (default: 0,2,3,4,5,6,8; 0 = pruned, 16 = kept in float16)"
    )
    group_size: int = option(DEFAULT_GROUP_SIZE, help="weights per scale/zero along the input dim; -1 = whole channel")
    targets: str | None = option(
        None, help="regex of target module names (default: every nn.Linear in the decoder blocks)"
    )
    exclude: str | None = option(None, help="regex of module names to leave in full precision")
    loss_calibration: str = option(
        "auto",
        flag="--loss-calibration",
        aliases=("--calibrate",),
        choices=_calibrations,
        help="map curves to loss units per layer by each layer's loss response: "
        "auto = the proxies (imatrix, snr) by gradient (layer-loss with offload), "
        "gradient = every estimator by responses predicted from one "
        "forward+backward, layer-loss = every estimator by responses measured one "
        "layer at a time (a pass through the later blocks per layer), none = raw "
        "curves",
    )
    loss_calibration_samples: int = option(
        16, aliases=("--calib-loss-samples",), help="calibration samples used for each layer's loss response"
    )
    probes: int = option(8, help="Hutchinson probe rounds")
    micro_batch: int = option(8, help="calibration samples per forward pass")
    checkpointing: bool = option(
        False, help="activation checkpointing for the gradient estimators (less memory, more time)"
    )
    offload: bool = option(
        False, help="keep decoder blocks on the CPU and move one at a time to the device (imatrix, snr)"
    )

    def __post_init__(self):
        if isinstance(self.bits, (list, tuple)):
            self.bits = ",".join(str(int(b)) for b in self.bits)


@dataclass
class SearchConfig(SensitivityConfig):
    group_size: int | None = option(
        None,
        help="weights per scale/zero along the input dim; -1 = whole channel "
        "(default: the sensitivity table's, else 128)",
        show_default=False,
    )
    budget: str | None = option(
        None, help="avg bits all-in (e.g. 2.5) or target bytes (12MB, 12MiB)", show_default=False
    )
    method: str = option(
        "greedy",
        choices=lambda: _search_methods(),
        help="greedy | ilp (exact) | snr (water-filling) | uniform | optuna (measured KL, "
        "Pareto front) | diffq (trained widths through rounding or noise)",
    )
    min_bits: int | None = option(
        2, help="smallest width allowed (0 allows pruning, which the imatrix estimate still under-prices)"
    )
    max_bits: int | None = option(None, help="largest width allowed")
    coupling: bool = option(
        True,
        flag="--no-coupling",
        help="with min-bits 0: prune rows one by one instead of whole MLP channels and "
        "key-value head groups (which also free down_proj / o_proj columns)",
    )
    granularity: str = option(
        "channel", group="--method ilp", help="channel | group:K | layer: channels sharing one width"
    )
    share: list[str] | None = option(
        None,
        group="--method ilp",
        append=True,
        metavar="REGEX",
        help=r"layers sharing one width, grouped by the regex's capture group, e.g. "
        r"'^(.*)\.self_attn\.[qkv]_proj$' (repeatable)",
    )
    layer_min_bits: list[str] | None = option(
        None,
        group="--method ilp",
        append=True,
        metavar="REGEX=WIDTH",
        help="smallest width for layers matching REGEX, e.g. down_proj=3 (repeatable)",
    )
    time_limit: float | None = option(
        None, group="--method ilp", help="seconds; returns the best plan found with its gap"
    )
    n_trials: int = option(50, group="--method optuna", help="trials to run (with resume: the total wanted)")
    timeout: float | None = option(None, group="--method optuna", help="stop starting trials after this many seconds")
    sampler: str = option(
        "nsga2", group="--method optuna", choices=["nsga2", "tpe"], help="multi-objective sampler (seeded by seed)"
    )
    storage: str | None = option(
        None,
        group="--method optuna",
        help="Optuna storage: a journal file or a database URL (default: OUT.optuna.journal next to the plan)",
    )
    study_name: str | None = option(
        None, group="--method optuna", help="study name (default: from the model and budget)"
    )
    resume: bool = option(
        False, group="--method optuna", help="continue an existing study (several workers: all pass it)"
    )
    span: float = option(0.25, group="--method optuna", help="trials also try budgets down to budget - span avg bits")
    kl_samples: int = option(
        KL_SAMPLES,
        group="--method optuna",
        help="calibration samples on which optuna measures KL and diffq trains; as many "
        "more, held out, choose among the candidates",
    )
    steps: int = option(100, group="--method diffq", help="training steps")
    lr: float = option(0.05, group="--method diffq", help="Adam learning rate of the width logits")
    relax: str = option(
        "rtn",
        group="--method diffq",
        choices=["rtn", "noise"],
        help="training forward: the round-to-nearest weights of the two menu widths around each "
        "channel's width, interpolated, or pseudo-quantization noise of the width's step",
    )
    learn: str = option(
        "channel",
        group="--method diffq",
        choices=["channel", "layer"],
        help="train a width per channel, or one shift per layer on top of the estimator's widths",
    )
    format: str | None = option(
        None,
        group="--format",
        choices=lambda: _formats(),
        help="plan for a runtime format: one width per module (exact ilp), priced and budgeted in the format's bytes",
    )
    fused: bool = option(
        True,
        flag="--no-fused",
        group="--format",
        help="with format: let q/k/v and gate/up take their own widths (by default they share "
        "one, as serving runtimes fuse them)",
    )
    types: str | None = option(
        None,
        group="--format gguf",
        metavar="LIST",
        help="ggml type menu, comma-separated (default: IQ2_XXS,IQ2_XS,IQ2_S,Q2_K,IQ3_XXS,"
        "Q3_K,IQ3_S,IQ4_XS,Q4_K,Q5_K,Q6_K,Q8_0)",
    )
    ref_type: str = option(
        "Q2_K", group="--format gguf", help="type whose measured loss response calibrates each tensor's curve"
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.budget, (int, float)) and not isinstance(self.budget, bool):
            self.budget = repr(float(self.budget)) if isinstance(self.budget, float) else str(self.budget)


@dataclass
class FinalizeConfig(CalibConfig):
    method: str = option(
        "qat",
        choices=lambda: _finalizers(),
        help="qat (quantization-aware training; by default SignRound's rounding, then the step sizes "
        "end to end) | signround (learned rounding only) | gptq (rounding with error feedback)",
    )
    init: str | None = option(
        None,
        choices=lambda: _starts(),
        help="QAT or SignRound starts from round-to-nearest or from another rounder's rounding "
        "(default: signround for QAT e2e, rtn otherwise)",
    )
    mode: str | None = option(
        None,
        choices=["e2e", "tiled", "tiled+e2e"],
        help="QAT: e2e distillation, forward-tiled block training, or tiled then a short e2e pass (default: e2e)",
    )
    round_mode: str = option(
        "ste", flag="--round", choices=["ste", "sigmoid"], help="rounding gradient: straight-through or Sigmoid STE"
    )
    temperature: float = option(0.0, help="Sigmoid STE temperature T; 0 = STE")
    anneal: bool = option(False, help="raise T linearly from 0 to the temperature over training")
    clamp_mode: str = option(
        "hard", flag="--clamp", choices=["hard", "soft"], help="clamping gradient: hard or SoftClamp"
    )
    beta: float = option(1.0, help="SoftClamp gate sharpness")
    soft_warmup: int = option(0, help="first N steps use the surrogates in the forward too")
    steps: int | None = option(None, help="training steps, tiled: per tile (default: e2e 100, tiled 200)")
    e2e_steps: int | None = option(None, help="steps of the e2e pass after tiles (default: steps/2)")
    lr: float | None = option(None, help="Adam learning rate (default: e2e 2e-5, tiled 1e-4)")
    qparam_lr: float | None = option(None, help="learning rate of step sizes and zeros (default: lr)")
    batch_size: int = option(8, help="samples per step")
    tile_size: int = option(3, help="decoder blocks per tile")
    tile_loss: str = option("l2", choices=["l2", "l1"], help="tile output loss")
    tile_guard: bool = option(
        True,
        flag="--no-tile-guard",
        help="keep a tile's trained parameters even when training made its loss worse "
        "(default: keep the initial ones then)",
    )
    ce_weight: float = option(0.0, help="add this x cross-entropy to the e2e KL")
    trainable: str | None = option(
        None,
        choices=["all", "scales"],
        help="QAT trains weights, step sizes and zeros (all), or only the step sizes, with the codes "
        "and zeros frozen at the start's rounding (scales) (default: e2e scales, tiled all)",
    )
    signround_steps: int = option(200, help="SignRound steps per block")
    signround_lr: float | None = option(None, help="SignRound learning rate (default: 1/steps)")
    gptq_damp: float = option(0.01, help="GPTQ damping, a fraction of mean(diag H)")
    gptq_act_order: bool = option(
        True, flag="--no-gptq-act-order", help="GPTQ in column order instead of by decreasing diag H"
    )
    checkpoint_every: float = option(300.0, help="seconds between QAT checkpoints OUT.qat-checkpoint.pt")
    resume: bool = option(False, help="continue from OUT.qat-checkpoint.pt")


@dataclass
class ApplyConfig(RunConfig):
    fake: bool = option(False, help="write a plain HF checkpoint of dequantized weights")


@dataclass
class EvalConfig(RunConfig):
    max_tokens: int | None = option(None, help="evaluate on the first N tokens (default: all)")
    seq_len: int = option(512, help="window length in tokens")
    micro_batch: int = option(4, help="windows per forward pass")


@dataclass
class GenerateConfig(RunConfig):
    dtype: str | None = option(
        None,
        help="dtype the model is loaded in: float32 | bfloat16 | float16 (default: "
        "float32; a packed checkpoint: the dtype its untouched tensors were saved in)",
    )
    max_new_tokens: int = option(64, help="tokens to generate")
    stop_at_eos: bool = option(
        True, flag="--no-stop-at-eos", help="generate every token, past the tokenizer's end-of-sequence token"
    )


@dataclass
class ExportConfig(RunConfig):
    format: str = option("packed", choices=lambda: _formats(), help="output format")
    layout: str = option(
        "block",
        choices=["block", "group"],
        help="compressed-tensors zero points: block (unpacked; transformers loads it) | group "
        "(packed; the llm-compressor / vLLM layout, which transformers 5.25 cannot load)",
    )


@dataclass
class ParetoConfig:
    study_name: str | None = option(None, help="study name (default: the only one in the storage)")
    csv: str | None = option(None, help="also write every trial to this CSV")
    export: int | None = option(None, help="write the plan of this trial number to --out")


@dataclass
class PlotSensitivityConfig:
    estimator: str | None = option(None, help="estimator whose curves to show (default: the table's first)")
    width: int | None = option(None, help="reference width for the error panels (default: 2)")


@dataclass
class PlotPlanConfig:
    title: str | None = option(None, help="a title line to add")


@dataclass
class PlotParetoConfig(RunConfig):
    study_name: str | None = option(None, help="study name (default: the only one in the storage)")
    kl_samples: int = option(
        KL_SAMPLES, help="calibration samples for the uniform points' KL; use the study's kl-samples"
    )
    seq_len: int = option(512, help="tokens per calibration sample")
    seed: int = option(0, help="seed for choosing calibration windows")


@dataclass
class DemoConfig(RunConfig):
    budgets: str = option("2.5,3.0,3.5", help="avg-bit budgets to search")
