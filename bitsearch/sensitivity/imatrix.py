"""The importance matrix (llama.cpp's ``imatrix``): per input column j of each target,

    imatrix_j = mean over calibration tokens of x_j^2

and the channel error curve e_c(b) = sum_j imatrix_j * (w_cj - q_b(w)_cj)^2, which is the
expected squared error of output c when that row is stored at b bits (b = 0: the whole row,
i.e. pruning), ignoring correlations between input columns. The unit is the layer's output
variance, not the model's loss: the pipeline calibrates it per layer before any allocator
compares layers (see ``calibrate.py`` and DESIGN.md's measured pitfalls).

For an embedding target the "input" is the token: a row (one token) is weighted by the token's
frequency p_c in the calibration text, e_c(b) = p_c * ||w_c - q_b(w_c)||^2.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models import Target
from .base import InputEstimator, LayerCurves, register_estimator
from .residuals import weighted_sq_errors

__all__ = ["ImatrixEstimator", "weighted_error_curves", "row_weighted_error_curves"]


def weighted_error_curves(
    weight: torch.Tensor, col_weight: torch.Tensor, bits: list[int], group_size: int
) -> np.ndarray:
    """(out, n_bits): sum_j col_weight_j * (w_cj - q_b(w)_cj)^2 for each width b."""
    return weighted_sq_errors(weight, bits, group_size, col_weight)


def row_weighted_error_curves(
    weight: torch.Tensor, row_weight: torch.Tensor, bits: list[int], group_size: int
) -> np.ndarray:
    """(out, n_bits): row_weight_c * ||w_c - q_b(w_c)||^2 (embedding targets)."""
    return weighted_sq_errors(weight, bits, group_size) * row_weight.double().cpu().numpy()[:, None]


@register_estimator
class ImatrixEstimator(InputEstimator):
    name = "imatrix"
    loss_units = False
    input_stats = "diag"

    def layer_curves(
        self, target: Target, weight: torch.Tensor, stats: torch.Tensor, bits: list[int], group_size: int
    ) -> LayerCurves:
        w = weight.detach()
        if target.kind == "embedding":
            errors = row_weighted_error_curves(w, stats, bits, group_size)
            energy = stats.double().cpu().numpy() * w.double().pow(2).sum(1).cpu().numpy()
        else:
            diag = stats.diagonal() if stats.dim() == 2 else stats
            errors = weighted_error_curves(w, diag, bits, group_size)
            energy = (w.double().pow(2) * diag.to(w.device).double()).sum(1).cpu().numpy()
        return LayerCurves(errors=errors, metrics={"row_energy": energy})
