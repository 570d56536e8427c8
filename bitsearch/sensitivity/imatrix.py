"""The importance matrix (llama.cpp's ``imatrix``): per input column j of each target,

    imatrix_j = mean over calibration tokens of x_j^2

and the channel error curve e_c(b) = sum_j imatrix_j * (w_cj - q_b(w)_cj)^2, which is the
expected squared error of output c when that row is stored at b bits (b = 0: the whole row,
i.e. pruning), ignoring correlations between input columns. The unit is the layer's output
variance, not the model's loss: the pipeline calibrates it per layer before any allocator
compares layers (see ``calibrate.py`` and DESIGN.md's measured pitfalls).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models import Target
from ..progress import progress
from ..quant.grid import fake_quantize
from .base import Estimator, LayerCurves, register_estimator

__all__ = ["ImatrixEstimator", "collect_imatrix", "weighted_error_curves"]


@torch.no_grad()
def collect_imatrix(model: nn.Module, targets: list[Target], batch: torch.Tensor, micro_batch: int = 8,
                    show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean of x^2 per input column of each target over all calibration tokens (float64)."""
    modules = dict(model.named_modules())
    sums = {t.name: torch.zeros(t.in_features, dtype=torch.float64) for t in targets}
    counts = {t.name: 0 for t in targets}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.float().pow(2).sum(0).double().cpu()
            counts[name] += x.shape[0]
        return fn

    handles = [modules[t.name].register_forward_pre_hook(hook(t.name)) for t in targets]
    dev = next(model.parameters()).device
    try:
        for i in progress(range(0, batch.shape[0], micro_batch), desc="imatrix", enable=show_progress):
            model(input_ids=batch[i:i + micro_batch].to(dev))
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def weighted_error_curves(weight: torch.Tensor, col_weight: torch.Tensor, bits: list[int],
                          group_size: int) -> np.ndarray:
    """(out, n_bits): sum_j col_weight_j * (w_cj - q_b(w)_cj)^2 for each width b."""
    w = weight.detach().float().cpu()
    cw = col_weight.float().cpu()
    out = np.empty((w.shape[0], len(bits)), dtype=np.float64)
    for k, b in enumerate(bits):
        d = w - fake_quantize(w, b, group_size)
        out[:, k] = (d.double().pow(2) * cw.double()).sum(1).numpy()
    return out


@register_estimator
class ImatrixEstimator(Estimator):
    name = "imatrix"
    loss_units = False

    def estimate(self, model, targets, batch, bits, group_size, micro_batch=8, show_progress=True):
        imat = collect_imatrix(model, targets, batch, micro_batch, show_progress)
        modules = dict(model.named_modules())
        result = {}
        for t in targets:
            w = modules[t.name].weight
            errors = weighted_error_curves(w, imat[t.name], bits, group_size)
            row_energy = (w.detach().double().cpu().pow(2) * imat[t.name]).sum(1).numpy()
            result[t.name] = LayerCurves(errors=errors, metrics={"imatrix_row_energy": row_energy})
        return result
