"""Per-layer calibration of error curves to the calibration loss ("layer-loss").

Layer-local proxies (imatrix) are not in units of the model's loss, so a single Lagrange
multiplier across layers misallocates (DESIGN.md, measured pitfalls). For each target layer l
we measure the loss response to quantizing that layer alone at a reference width b_ref
(default 2 bits, round-to-nearest with the plan's group size):

    dL_l = L(model with layer l at b_ref) - L(float model)        (on a calibration subset)
    s_l  = max(dL_l, floor) / sum_c e_c(b_ref)

and rescale every curve of the layer: e_c(b) <- s_l * e_c(b). The calibrated curves sum to
the measured loss increase at b_ref and keep the proxy's ranking of channels and widths
inside the layer. One forward pass over the subset per layer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..evaluate import batch_nll
from ..models import Target
from ..progress import progress
from ..quant.grid import fake_quantize
from .base import LayerCurves

__all__ = ["layer_loss_response", "calibrate_layer_loss"]

#: response floor in nats: a layer whose measured response is below it counts as this small.
RESPONSE_FLOOR = 1e-6


@torch.no_grad()
def layer_loss_response(model: nn.Module, targets: list[Target], batch: torch.Tensor, bits: int,
                        group_size: int, micro_batch: int = 8, show_progress: bool = True) -> dict[str, float]:
    """Calibration-loss increase when each target alone is fake-quantized at ``bits``."""
    modules = dict(model.named_modules())
    base = batch_nll(model, batch, micro_batch)
    out = {}
    for t in progress(targets, desc=f"layer response @{bits}b", enable=show_progress):
        w = modules[t.name].weight
        saved = w.data.clone()
        try:
            w.data.copy_(fake_quantize(saved.float(), bits, group_size).to(saved.dtype))
            out[t.name] = batch_nll(model, batch, micro_batch) - base
        finally:
            w.data.copy_(saved)
    return out


def calibrate_layer_loss(curves: dict[str, LayerCurves], responses: dict[str, float], bits: list[int],
                         ref_bits: int) -> dict[str, LayerCurves]:
    """Rescale each layer's curves so they sum to its measured response at ``ref_bits``."""
    k = bits.index(ref_bits)
    out = {}
    for name, lc in curves.items():
        total = float(lc.errors[:, k].sum())
        scale = max(responses[name], RESPONSE_FLOOR) / total if total > 0 else 0.0
        metrics = dict(lc.metrics, layer_response=np.full(lc.errors.shape[0], responses[name]),
                       layer_scale=np.full(lc.errors.shape[0], scale))
        out[name] = LayerCurves(errors=lc.errors * scale, metrics=metrics)
    return out
