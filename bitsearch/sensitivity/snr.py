"""The capacity view: each weight row is a channel carrying signal w_c . x; quantization adds
noise (w_c - q_b(w_c)) . x. Over the calibration inputs (second moment Sigma = E[x x^T]):

    S_c    = E[(w_c . x)^2]                 = w_c Sigma w_c^T          (signal power)
    N_c(b) = E[((w_c - q_b(w_c)) . x)^2]    = d_b Sigma d_b^T          (noise power)
    SNR_c(b) = 10 log10(S_c / N_c(b))  dB

Uniform quantization gains about 6.02 dB per bit (the noise amplitude halves); the
``slope_db`` metric is each channel's least-squares slope of SNR against bits over the
quantizing widths (2..8) of the menu. Pruning is N_c(0) = S_c (0 dB). The error curve is
e_c(b) = N_c(b): the full-covariance version of imatrix's diagonal estimate, in output-power
units (calibrated per layer by the pipeline). The ``snr`` allocator does reverse
water-filling on these curves (``search/waterfill.py``).

For an embedding target Sigma is diagonal over tokens: S_c = p_c ||w_c||^2,
N_c(b) = p_c ||w_c - q_b(w_c)||^2.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models import Target
from .base import InputEstimator, LayerCurves, register_estimator
from .imatrix import row_weighted_error_curves
from .residuals import quant_residuals

__all__ = ["SnrEstimator", "snr_db", "db_slope"]

#: SNR reported for a noiseless channel (e.g. width 16 on a row fp16 holds exactly)
MAX_DB = 200.0


def snr_db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(signal / noise)
    db = np.where(noise <= 0, MAX_DB, db)
    return np.where(signal <= 0, 0.0, np.clip(db, -MAX_DB, MAX_DB))


def db_slope(bits: list[int], db: np.ndarray) -> np.ndarray:
    """Per-row least-squares slope of dB against bits over the widths 2..8 (NaN if < 2 widths)."""
    ks = [k for k, b in enumerate(bits) if 2 <= b <= 8]
    if len(ks) < 2:
        return np.full(db.shape[0], np.nan)
    x = np.asarray([bits[k] for k in ks], dtype=np.float64)
    y = db[:, ks]
    xc = x - x.mean()
    return ((y - y.mean(1, keepdims=True)) * xc).sum(1) / (xc**2).sum()


@register_estimator
class SnrEstimator(InputEstimator):
    name = "snr"
    loss_units = False
    input_stats = "full"

    def layer_curves(
        self, target: Target, weight: torch.Tensor, stats: torch.Tensor, bits: list[int], group_size: int
    ) -> LayerCurves:
        w = weight.detach()
        if target.kind == "embedding":
            noise = row_weighted_error_curves(w, stats, bits, group_size)
            signal = stats.double().cpu().numpy() * w.double().pow(2).sum(1).cpu().numpy()
        else:
            sigma = stats.to(w.device).double()
            wd = w.double()
            signal = ((wd @ sigma) * wd).sum(1).cpu().numpy()
            noise = np.empty((w.shape[0], len(bits)))
            for k, _b, d in quant_residuals(w, bits, group_size):
                dd = d.double()
                noise[:, k] = ((dd @ sigma) * dd).sum(1).clamp_min(0).cpu().numpy()
        return self._curves(signal, noise, bits)

    @staticmethod
    def _curves(signal: np.ndarray, noise: np.ndarray, bits: list[int]) -> LayerCurves:
        db = snr_db(signal[:, None], noise)
        metrics = {"signal": signal, "slope_db": db_slope(bits, db)}
        metrics.update({f"db{b}": db[:, k] for k, b in enumerate(bits) if b != 0})
        return LayerCurves(errors=noise, metrics=metrics)

    def combine(self, a: LayerCurves, b: LayerCurves, bits: list[int]) -> LayerCurves:
        """Two uses of one weight: signal and noise powers add."""
        return self._curves(a.metrics["signal"] + b.metrics["signal"], a.errors + b.errors, bits)
