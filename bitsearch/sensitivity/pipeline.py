"""compute_sensitivity: run estimators on a calibration batch and build a SensitivityTable.

Input estimators (imatrix, snr) share one block-by-block pass that collects the statistics
they need (``stats.py``, ``bitsearch.blocks``); gradient estimators (fisher, hutchinson) run their
own passes. Curves not already in loss units are calibrated per layer (``calibrate.py``): each
layer's loss response at the reference width (and to pruning its cheapest rows) is predicted
for every layer from one forward+backward (``grad_response.py``, "gradient") or measured
layer by layer ("layer-loss"), once for all calibrated estimators. Under ``torchrun`` every
pass covers this rank's micro-batches and the sums are all-reduced (``distributed.py``).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import __version__
from ..blocks import BlockRunner, block_of
from ..distributed import Dist
from ..errors import BitsearchError
from ..models import Target, model_fingerprint
from ..progress import progress
from ..quant.grid import VALID_WIDTHS
from .base import GradientEstimator, InputEstimator, LayerCurves, SensitivityContext, get_estimator
from .calibrate import calibrate_layer_loss, layer_loss_response, prune_loss_response, prune_rows
from .grad_response import gradient_responses
from .stats import InputStats
from .table import SensitivityTable, err_col, format_mix, parse_mix

__all__ = [
    "DEFAULT_BITS",
    "CALIBRATIONS",
    "check_bits",
    "check_group_size",
    "compute_sensitivity",
    "collect_input_curves",
]

DEFAULT_BITS = [0, 2, 3, 4, 5, 6, 8]
#: width at which layer-loss calibration measures each layer's response
CALIB_REF_BITS = 2
#: auto: calibrate the proxies by "gradient" ("layer-loss" with offload), keep estimators already in
#: loss units; gradient / layer-loss: calibrate every estimator by that method; none: raw curves
CALIBRATIONS = ("auto", "gradient", "layer-loss", "none")


def check_bits(bits: list[int]) -> list[int]:
    bad = [b for b in bits if b not in VALID_WIDTHS]
    if bad:
        raise BitsearchError(
            f"bit width {bad[0]} is not in the menu of possible widths {', '.join(map(str, VALID_WIDTHS))}"
        )
    if not bits:
        raise BitsearchError("the bit menu is empty")
    return sorted(set(bits))


def check_group_size(group_size: int) -> int:
    if group_size != -1 and group_size < 1:
        raise BitsearchError(f"group_size must be -1 (one group per channel) or positive (got {group_size})")
    return group_size


@torch.no_grad()
def collect_input_curves(
    ctx: SensitivityContext, estimators: list[InputEstimator], offload: bool = False
) -> dict[str, dict[str, LayerCurves]]:
    """One block-by-block pass: input statistics of each block's targets, turned into every
    input estimator's curves before the next block runs. Returns {estimator: {layer: curves}}."""
    kind = "full" if any(e.input_stats == "full" for e in estimators) else "diag"
    runner = BlockRunner(ctx.model, offload=offload)
    modules = dict(ctx.model.named_modules())
    by_block: dict[int | None, list[Target]] = {}
    for t in ctx.targets:
        by_block.setdefault(block_of(runner, t.name), []).append(t)
    out: dict[str, dict[str, LayerCurves]] = {e.name: {} for e in estimators}

    def curves_of(stats: InputStats, t: Target, name: str | None = None) -> dict[str, LayerCurves]:
        w = modules[t.name].weight
        s = stats.mean(name or t.name).to(w.device)
        return {e.name: e.layer_curves(t, w, s, ctx.bits, ctx.group_size) for e in estimators}

    def store(t: Target, lcs: dict[str, LayerCurves]) -> None:
        for e in estimators:
            out[e.name][t.name] = lcs[e.name]

    xs = [x for _j, x in ctx.micro_batches()]
    outside = by_block.get(None, [])
    emb = [t for t in outside if t.kind == "embedding"]
    head = [t for t in outside if t.kind != "embedding"]
    tied = {h: t for t in emb for h in t.tied}  # a tied lm_head's inputs count for its embedding
    caps = []
    with InputStats({t.name: modules[t.name] for t in emb}, kind) as emb_stats:
        for x in xs:
            caps.append(runner.capture(x))
            emb_stats.end_pass()
    emb_stats.all_reduce(ctx.dist)
    hs, kws = [c[0] for c in caps], [c[1] for c in caps]
    for i in progress(range(runner.n_blocks), desc=f"inputs ({kind})", enable=ctx.show_progress and ctx.dist.is_main):
        tg = by_block.get(i, [])
        with runner.on_device(i) as block, InputStats({t.name: modules[t.name] for t in tg}, kind) as stats:
            new = []
            for h, kw in zip(hs, kws):
                new.append(runner.run_block(block, h, kw))
                stats.end_pass()
            hs = new
            stats.all_reduce(ctx.dist)
            for t in tg:
                store(t, curves_of(stats, t))
    if head or tied:
        with InputStats({n: modules[n] for n in [t.name for t in head] + list(tied)}, kind) as tail:
            for h, x in zip(hs, xs):
                runner.logits(h, x)
                tail.end_pass()
        tail.all_reduce(ctx.dist)
        for t in head:
            store(t, curves_of(tail, t))
    for t in emb:
        lcs = curves_of(emb_stats, t)
        for h in t.tied:
            as_head = Target(h, t.out_features, t.in_features, "linear")
            lin = {
                e.name: e.layer_curves(
                    as_head,
                    modules[t.name].weight,
                    tail.mean(h).to(modules[t.name].weight.device),
                    ctx.bits,
                    ctx.group_size,
                )
                for e in estimators
            }
            lcs = {e.name: e.combine(lcs[e.name], lin[e.name], ctx.bits) for e in estimators}
        store(t, lcs)
    return out


def compute_sensitivity(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    *,
    estimators: str | list[str] = "imatrix",
    bits: list[int] | None = None,
    group_size: int = 128,
    calibrate: str = "auto",
    calib_ref_bits: int = CALIB_REF_BITS,
    calib_samples: int = 16,
    prune_fraction: float = 0.125,
    micro_batch: int = 8,
    probes: int = 8,
    seed: int = 0,
    mix: str | dict | None = None,
    offload: bool = False,
    checkpointing: bool = False,
    dist: Dist | None = None,
    calib_info: dict | None = None,
    show_progress: bool = True,
    imatrix: dict[str, torch.Tensor] | None = None,
) -> SensitivityTable:
    """Per-channel error curves of every target from each estimator, in one table.

    ``calibrate``: "auto" rescales curves not already in loss units by each layer's loss
    response at ``calib_ref_bits`` (on the first ``calib_samples`` calibration samples) and,
    when 0 is in the menu, their pruning column by the response to pruning ``prune_fraction``
    of each layer's rows, both predicted from one forward+backward ("gradient"; measured layer
    by layer with ``offload``, where the whole model is never on the device); "gradient" and
    "layer-loss" (the exact per-layer measurement) do so for every estimator; "none" keeps raw
    curves. ``mix`` is the table's default estimator mix (default: equal weights).
    ``imatrix`` ({target: mean x_j^2}, e.g. from a llama.cpp imatrix file) replaces the statistics
    pass of the imatrix estimator.
    """
    names = [estimators] if isinstance(estimators, str) else list(estimators)
    names = list(dict.fromkeys(n.strip() for n in ",".join(names).split(",") if n.strip()))
    if not names:
        raise BitsearchError("no estimator given (`estimators` imatrix,snr,fisher,hutchinson)")
    ests = [get_estimator(n) for n in names]
    bits = check_bits(list(bits or DEFAULT_BITS))
    group_size = check_group_size(group_size)
    if calibrate not in CALIBRATIONS:
        raise BitsearchError(f"unknown calibration '{calibrate}' (choose from {', '.join(CALIBRATIONS)})")
    if micro_batch < 1:
        raise BitsearchError(f"micro_batch must be at least 1 (got {micro_batch})")
    if probes < 1:
        raise BitsearchError(f"`probes` must be at least 1 (got {probes})")
    dist = dist or Dist()
    ctx = SensitivityContext(
        model=model,
        targets=targets,
        batch=batch,
        bits=bits,
        group_size=group_size,
        micro_batch=micro_batch,
        show_progress=show_progress and dist.is_main,
        dist=dist,
        seed=seed,
        probes=probes,
        checkpointing=checkpointing,
    )
    if ctx.n_micro < dist.world:
        raise BitsearchError(
            f"{ctx.n_micro} calibration micro-batches cannot be shared by {dist.world} processes "
            f"(use more `samples` or a smaller micro_batch)"
        )
    grads = [e for e in ests if isinstance(e, GradientEstimator)]
    if grads and offload:
        raise BitsearchError(
            f"`offload` streams blocks and works only with imatrix and snr, not {', '.join(e.name for e in grads)}"
        )
    calibrated = [
        e for e in ests if calibrate in ("gradient", "layer-loss") or (calibrate == "auto" and not e.loss_units)
    ]
    method = "layer-loss" if calibrate == "layer-loss" or (calibrate == "auto" and offload) else "gradient"
    if calibrated and method == "gradient" and offload:
        raise BitsearchError(
            "loss_calibration gradient runs the whole model at once and cannot be combined with "
            "`offload` (use loss_calibration layer-loss)"
        )
    if calibrated and calib_samples < 1:
        raise BitsearchError(f"loss_calibration_samples must be at least 1 (got {calib_samples})")
    if calibrated and calib_ref_bits not in bits:
        raise BitsearchError(f"calibration width {calib_ref_bits} must be in the bit menu {bits}")
    if calibrated and 0 in bits and not 0 < prune_fraction <= 1:
        raise BitsearchError(f"prune fraction {prune_fraction} must lie in (0, 1]")
    default_mix = parse_mix(mix, names) or {n: 1.0 / len(names) for n in names}

    t_start = time.time()
    curves: dict[str, dict[str, LayerCurves]] = {}
    seconds: dict[str, float] = {}
    inputs = [e for e in ests if isinstance(e, InputEstimator)]
    stages: dict[str, float] = {}
    if imatrix is not None:
        if names != ["imatrix"]:
            raise BitsearchError(
                f"an imatrix file replaces the imatrix estimator's statistics only, not "
                f"{', '.join(n for n in names if n != 'imatrix') or 'others'}"
            )
        t0 = time.time()
        modules = dict(model.named_modules())
        curves["imatrix"] = {
            t.name: ests[0].layer_curves(
                t, modules[t.name].weight, imatrix[t.name].to(modules[t.name].weight.device), bits, group_size
            )
            for t in targets
        }
        seconds["imatrix"] = stages["imatrix file"] = time.time() - t0
        inputs = []
    if inputs:
        t0 = time.time()
        curves.update(collect_input_curves(ctx, inputs, offload))
        stages["input statistics and curves"] = time.time() - t0
        for e in inputs:  # one shared pass: each input estimator is charged its full time
            seconds[e.name] = stages["input statistics and curves"]
    for e in grads:
        t0 = time.time()
        curves[e.name] = e.estimate(ctx)
        seconds[e.name] = stages[e.name] = time.time() - t0
    sub = batch[:calib_samples]
    info: dict[str, dict] = {}
    response_seconds = 0.0
    if calibrated:  # once for every calibrated estimator (and charged in full to each)
        t0 = time.time()
        rows = {e.name: prune_rows(curves[e.name], bits, prune_fraction) for e in calibrated} if 0 in bits else {}
        if method == "gradient":
            responses, prune_responses = gradient_responses(
                model,
                targets,
                sub,
                calib_ref_bits,
                group_size,
                rows,
                micro_batch,
                checkpointing,
                ctx.show_progress,
                dist,
            )
        else:
            responses = layer_loss_response(
                model, targets, sub, calib_ref_bits, group_size, micro_batch, ctx.show_progress, dist, offload
            )
            prune_responses = {
                k: prune_loss_response(model, targets, sub, r, micro_batch, ctx.show_progress, dist, offload)
                for k, r in rows.items()
            }
        response_seconds = stages[f"calibration ({method})"] = time.time() - t0
    for e in ests:
        if e not in calibrated:
            info[e.name] = {
                "calibration": "native" if e.loss_units else "none",
                "units": "calibration-loss increase (nats/token)" if e.loss_units else "layer-local proxy",
            }
            continue
        prune = (rows[e.name], prune_responses[e.name]) if 0 in bits else None
        curves[e.name] = calibrate_layer_loss(curves[e.name], responses, bits, calib_ref_bits, prune)
        seconds[e.name] += response_seconds
        info[e.name] = {"calibration": method, "units": "calibration-loss increase (nats/token)"}
    for e in ests:
        info[e.name]["seconds"] = round(seconds[e.name], 2)
        info[e.name].update(e.summary or {})
        bad = sum(int((~np.isfinite(lc.errors)).sum()) for lc in curves[e.name].values())
        if bad:
            raise BitsearchError(f"estimator {e.name} produced {bad} non-finite errors (is the model finite?)")

    frames = []
    for t in targets:
        cols = {"layer": t.name, "channel": np.arange(t.out_features), "in_features": t.in_features}
        for e in ests:
            lc = curves[e.name][t.name]
            cols.update({f"{e.name}.{k}": v for k, v in lc.metrics.items()})
            cols.update({err_col(b, e.name): lc.errors[:, k] for k, b in enumerate(bits)})
        frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True)
    meta = {
        "estimators": names,
        "estimator_info": info,
        "mix": default_mix,
        "mix_text": format_mix(default_mix),
        "bits": bits,
        "group_size": group_size,
        "calibration": calibrate,
        "calibration_method": method if calibrated else None,
        "calib_ref_bits": calib_ref_bits,
        "calib_loss_samples": min(calib_samples, batch.shape[0]),
        "prune_fraction": prune_fraction if 0 in bits else None,
        "probes": probes if any(e.name == "hutchinson" for e in ests) else None,
        "seed": seed,
        "micro_batch": micro_batch,
        "world_size": dist.world,
        "offload": offload,
        "units": "calibration-loss increase (nats/token)"
        if all(i["units"].startswith("calibration") for i in info.values())
        else "mixed: see estimator_info",
        "target_kinds": {t.name: t.kind for t in targets if t.kind != "linear"},
        "model": model_fingerprint(model, targets),
        "calibration_data": calib_info or {},
        "seconds": round(time.time() - t_start, 2),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "package_version": __version__,
    }
    return SensitivityTable(df=df, meta=meta)
