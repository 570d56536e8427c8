"""Per-layer calibration of error curves to the calibration loss ("layer-loss").

Layer-local proxies (imatrix, snr) are not in units of the model's loss, so a single Lagrange
multiplier across layers misallocates (DESIGN.md, measured pitfalls). For each target layer l
we measure the loss response to quantizing that layer alone at a reference width b_ref
(default 2 bits, round-to-nearest with the plan's group size):

    dL_l = L(model with layer l at b_ref) - L(float model)        (on a calibration subset)
    s_l  = max(dL_l, floor) / sum_c e_c(b_ref)

and rescale every curve of the layer: e_c(b) <- s_l * e_c(b). The calibrated curves sum to
the measured loss increase at b_ref and keep the proxy's ranking of channels and widths
inside the layer. The float hidden states entering each block are cached, so a layer in
block i costs a pass through blocks i.. only (half a forward on average).

Pruning is calibrated on its own (when 0 is in the menu): removing a row is not small noise,
and a proxy scaled at 2 bits under-predicts it badly (with one scale for all widths the greedy
pruned 7 % of the channels of slm-llama-17m at 3.25 bits and perplexity went from 227 to 301).
For each layer we prune the fraction ``prune_fraction`` of its rows with the smallest proxy
e_c(0), measure that loss increase dL0_l, and set e_c(0) <- e_c(0) * dL0_l / sum_{pruned} e_c(0).
A second pass per layer (per estimator: the pruned rows depend on its ranking).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..blocks import BlockRunner, block_of
from ..distributed import Dist
from ..models import Target
from ..progress import progress
from ..quant.grid import fake_quantize
from .base import LayerCurves

__all__ = ["loss_response", "layer_loss_response", "prune_rows", "prune_loss_response", "calibrate_layer_loss"]

#: response floor in nats: a layer whose measured response is below it counts as this small.
RESPONSE_FLOOR = 1e-6


@torch.no_grad()
def loss_response(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    perturb: Callable[[str, torch.Tensor], torch.Tensor],
    desc: str,
    micro_batch: int,
    show_progress: bool,
    dist: Dist | None = None,
    offload: bool = False,
) -> dict[str, float]:
    """Mean-loss increase when ``perturb(name, weight)`` replaces one target's weight at a time."""
    dist = dist or Dist()
    runner = BlockRunner(model, offload=offload)
    n_micro = (batch.shape[0] + micro_batch - 1) // micro_batch
    xs = [batch[j * micro_batch : (j + 1) * micro_batch] for j in range(n_micro) if dist.owns(j)]
    count = batch.shape[0] * (batch.shape[1] - 1)
    caps = [runner.capture(x) for x in xs]
    hs, kws = [c[0] for c in caps], [c[1] for c in caps]

    def loss(i: int, h: list[torch.Tensor]) -> float:
        return dist.sum_float(runner.nll_from(i, h, kws, xs)) / count

    def full_loss() -> float:  # a target outside the blocks (embedding, head): whole model
        return loss(0, [runner.capture(x)[0] for x in xs])

    base = loss(0, hs)
    modules = dict(model.named_modules())
    where = {t.name: block_of(runner, t.name) for t in targets}
    order = sorted(targets, key=lambda t: (where[t.name] is None, where[t.name] or 0))
    out: dict[str, float] = {}
    cur = 0  # hs holds the float inputs of block `cur`
    for t in progress(order, desc=desc, enable=show_progress and dist.is_main):
        i = where[t.name]
        while i is not None and cur < i:
            with runner.on_device(cur) as block:
                hs = [runner.run_block(block, h, kw) for h, kw in zip(hs, kws)]
            cur += 1
        w = modules[t.name].weight
        saved = w.data.clone()
        try:
            w.data.copy_(perturb(t.name, w.data.float()).to(saved.dtype))
            out[t.name] = (loss(i, hs) if i is not None else full_loss()) - base
        finally:
            w.data.copy_(saved)
    return out


def layer_loss_response(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    bits: int,
    group_size: int,
    micro_batch: int = 8,
    show_progress: bool = True,
    dist: Dist | None = None,
    offload: bool = False,
) -> dict[str, float]:
    """Calibration-loss increase when each target alone is fake-quantized at ``bits``."""
    return loss_response(
        model,
        targets,
        batch,
        lambda _n, w: fake_quantize(w, bits, group_size),
        f"layer response @{bits}b",
        micro_batch,
        show_progress,
        dist,
        offload,
    )


def prune_rows(curves: dict[str, LayerCurves], bits: list[int], fraction: float) -> dict[str, np.ndarray]:
    """Per layer, the rows with the smallest proxy pruning error (at least one)."""
    k = bits.index(0)
    return {
        name: np.argsort(lc.errors[:, k], kind="stable")[: max(1, int(round(fraction * lc.errors.shape[0])))]
        for name, lc in curves.items()
    }


def prune_loss_response(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    rows: dict[str, np.ndarray],
    micro_batch: int = 8,
    show_progress: bool = True,
    dist: Dist | None = None,
    offload: bool = False,
) -> dict[str, float]:
    """Calibration-loss increase when the given rows of each target alone are pruned."""

    def prune(name, w):
        w = w.clone()
        w[torch.as_tensor(rows[name], dtype=torch.long, device=w.device)] = 0
        return w

    return loss_response(model, targets, batch, prune, "prune response", micro_batch, show_progress, dist, offload)


def calibrate_layer_loss(
    curves: dict[str, LayerCurves],
    responses: dict[str, float],
    bits: list[int],
    ref_bits: int,
    prune: tuple[dict[str, np.ndarray], dict[str, float]] | None = None,
) -> dict[str, LayerCurves]:
    """Rescale each layer's curves so they sum to its measured response at ``ref_bits``; with
    ``prune = (rows, responses)`` the 0-bit column gets its own scale from the pruning response."""
    k = bits.index(ref_bits)
    out = {}
    for name, lc in curves.items():
        n = lc.errors.shape[0]
        total = float(lc.errors[:, k].sum())
        scale = max(responses[name], RESPONSE_FLOOR) / total if total > 0 else 0.0
        errors = lc.errors * scale
        metrics = dict(lc.metrics, layer_response=np.full(n, responses[name]), layer_scale=np.full(n, scale))
        if prune is not None:
            rows, presp = prune
            k0 = bits.index(0)
            ptotal = float(lc.errors[rows[name], k0].sum())
            pscale = max(presp[name], RESPONSE_FLOOR) / ptotal if ptotal > 0 else 0.0
            errors[:, k0] = lc.errors[:, k0] * pscale
            metrics.update(prune_response=np.full(n, presp[name]), prune_scale=np.full(n, pscale))
        out[name] = LayerCurves(errors=errors, metrics=metrics)
    return out
