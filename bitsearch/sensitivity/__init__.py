"""Per-channel sensitivity estimators and their table."""

from . import fisher as _fisher  # noqa: F401  (importing registers the estimators)
from . import hutchinson as _hutchinson  # noqa: F401
from . import imatrix as _imatrix  # noqa: F401
from . import snr as _snr  # noqa: F401
from .base import ESTIMATORS, Estimator, LayerCurves, get_estimator, register_estimator
from .calibrate import calibrate_layer_loss, layer_loss_response
from .pipeline import CALIBRATIONS, DEFAULT_BITS, check_bits, check_group_size, compute_sensitivity
from .table import SensitivityTable, err_col, parse_mix

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "LayerCurves",
    "get_estimator",
    "register_estimator",
    "calibrate_layer_loss",
    "layer_loss_response",
    "CALIBRATIONS",
    "DEFAULT_BITS",
    "check_bits",
    "check_group_size",
    "compute_sensitivity",
    "SensitivityTable",
    "err_col",
    "parse_mix",
]
