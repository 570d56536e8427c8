"""The estimator contract and its registry.

An estimator turns (model, targets, calibration batch) into per-channel metrics and error
curves e_c(b) for every width b of the menu. Estimators whose curves are not already in
units of the calibration loss say so (``loss_units = False``); the pipeline then calibrates
them per layer (see ``calibrate.py``) so curves of different layers can be compared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import BitsearchError
from ..models import Target

__all__ = ["Estimator", "LayerCurves", "register_estimator", "get_estimator", "ESTIMATORS"]


@dataclass
class LayerCurves:
    """One layer's result: ``errors`` is (out_features, n_bits); ``metrics`` per channel."""

    errors: np.ndarray
    metrics: dict[str, np.ndarray]


class Estimator(ABC):
    name: str = ""
    #: True when the curves already predict the calibration-loss increase.
    loss_units: bool = False

    @abstractmethod
    def estimate(self, model: nn.Module, targets: list[Target], batch: torch.Tensor, bits: list[int],
                 group_size: int, micro_batch: int = 8, show_progress: bool = True) -> dict[str, LayerCurves]:
        """Curves for every target layer, keyed by layer name."""


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise BitsearchError(f"unknown estimator '{name}' (choose from {', '.join(sorted(ESTIMATORS))})") from None
