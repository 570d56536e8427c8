"""Quantization residuals d_b = w - q_b(w) of a weight, and their weighted squared norms per row,
the building block of every estimator's curves."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..quant.grid import fake_quantize

__all__ = ["quant_residuals", "weighted_sq_errors"]


def quant_residuals(weight: torch.Tensor, bits: list[int], group_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (k, b, w - q_b(w)) for each width of the menu (float32, on the weight's device)."""
    w = weight.detach().float()
    for k, b in enumerate(bits):
        yield k, b, w - fake_quantize(w, b, group_size)


def weighted_sq_errors(
    weight: torch.Tensor, bits: list[int], group_size: int, col_weight: torch.Tensor | None = None
) -> np.ndarray:
    """(out, n_bits) float64: sum_j c_j (w_cj - q_b(w)_cj)^2 for each width b; ``col_weight`` c is
    None (all ones) or a tensor broadcasting against the weight ((out, in) or (in,))."""
    cw = None if col_weight is None else col_weight.detach().to(weight.device).double()
    out = np.empty((weight.shape[0], len(bits)), dtype=np.float64)
    for k, _b, d in quant_residuals(weight, bits, group_size):
        d2 = d.double().pow(2)
        out[:, k] = (d2 if cw is None else d2 * cw).sum(1).cpu().numpy()
    return out
