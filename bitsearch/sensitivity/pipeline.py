"""compute_sensitivity: run estimators on a calibration batch and build a SensitivityTable."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import __version__
from ..errors import BitsearchError
from ..models import Target, model_fingerprint
from ..quant.grid import VALID_WIDTHS
from .base import get_estimator
from .calibrate import calibrate_layer_loss, layer_loss_response, prune_loss_response, prune_rows
from .table import SensitivityTable, err_col

__all__ = ["DEFAULT_BITS", "CALIBRATIONS", "check_bits", "compute_sensitivity"]

DEFAULT_BITS = [0, 2, 3, 4, 5, 6, 8]
#: width at which layer-loss calibration measures each layer's response
CALIB_REF_BITS = 2
CALIBRATIONS = ("layer-loss", "none")


def check_bits(bits: list[int]) -> list[int]:
    bad = [b for b in bits if b not in VALID_WIDTHS]
    if bad:
        raise BitsearchError(f"bit width {bad[0]} is not in the menu of possible widths "
                             f"{', '.join(map(str, VALID_WIDTHS))}")
    if not bits:
        raise BitsearchError("the bit menu is empty")
    return sorted(set(bits))


def check_group_size(group_size: int) -> int:
    if group_size != -1 and group_size < 1:
        raise BitsearchError(f"--group-size must be -1 (one group per channel) or positive (got {group_size})")
    return group_size


def compute_sensitivity(model: nn.Module, targets: list[Target], batch: torch.Tensor, *,
                        estimator: str = "imatrix", bits: list[int] | None = None, group_size: int = 128,
                        calibrate: str = "layer-loss", calib_ref_bits: int = CALIB_REF_BITS, calib_samples: int = 16,
                        prune_fraction: float = 0.125, micro_batch: int = 8, calib_info: dict | None = None,
                        show_progress: bool = True) -> SensitivityTable:
    """Per-channel error curves for every target, in one table.

    ``calibrate="layer-loss"`` rescales curves not already in loss units by each layer's measured
    loss response at ``calib_ref_bits`` (on the first ``calib_samples`` calibration samples) and,
    when 0 is in the menu, their pruning column by the response to pruning ``prune_fraction`` of
    each layer's rows.
    """
    bits = check_bits(list(bits or DEFAULT_BITS))
    group_size = check_group_size(group_size)
    if calibrate not in CALIBRATIONS:
        raise BitsearchError(f"unknown calibration '{calibrate}' (choose from {', '.join(CALIBRATIONS)})")
    est = get_estimator(estimator)
    t0 = time.time()
    curves = est.estimate(model, targets, batch, bits, group_size, micro_batch, show_progress)
    calibrated = est.loss_units
    if calibrate == "layer-loss" and not est.loss_units:
        ref = calib_ref_bits
        if ref not in bits:
            raise BitsearchError(f"calibration width {ref} must be in the bit menu {bits}")
        sub = batch[:calib_samples]
        responses = layer_loss_response(model, targets, sub, ref, group_size, micro_batch, show_progress)
        prune = None
        if 0 in bits:
            if not 0 < prune_fraction <= 1:
                raise BitsearchError(f"prune fraction {prune_fraction} must lie in (0, 1]")
            rows = prune_rows(curves, bits, prune_fraction)
            prune = (rows, prune_loss_response(model, targets, sub, rows, micro_batch, show_progress))
        curves = calibrate_layer_loss(curves, responses, bits, ref, prune)
        calibrated = True
    frames = []
    for t in targets:
        lc = curves[t.name]
        cols = {"layer": t.name, "channel": np.arange(t.out_features), "in_features": t.in_features}
        cols.update(lc.metrics)
        cols.update({err_col(b): lc.errors[:, k] for k, b in enumerate(bits)})
        frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True)
    meta = {
        "estimator": estimator,
        "bits": bits,
        "group_size": group_size,
        "calibration": calibrate if not est.loss_units else "native",
        "calib_ref_bits": calib_ref_bits,
        "calib_loss_samples": calib_samples,
        "prune_fraction": prune_fraction if 0 in bits else None,
        "units": "calibration-loss increase (nats/token)" if calibrated else "layer-local proxy",
        "model": model_fingerprint(model, targets),
        "calibration_data": calib_info or {},
        "seconds": round(time.time() - t0, 2),
        "package_version": __version__,
    }
    return SensitivityTable(df=df, meta=meta)
