"""The estimator contract, the context every estimator gets, and the registry.

Every estimator yields per-channel error curves e_c(b) for each width b of the menu. Two kinds:

* :class:`InputEstimator` needs only each target's inputs (``imatrix``, ``snr``): the pipeline
  collects input statistics (the diagonal or the full second moment of the inputs) in one
  shared pass, whole-model or block by block (``bitsearch.blocks``), and asks the estimator for a
  layer's curves from its weight and statistics.
* :class:`GradientEstimator` needs the loss's gradients (``fisher``, ``hutchinson``) and runs
  its own passes over the calibration micro-batches.

Estimators whose curves are not already in units of the calibration loss say so
(``loss_units = False``); the pipeline then calibrates them per layer (``calibrate.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..distributed import Dist
from ..errors import BitsearchError
from ..models import Target

__all__ = [
    "Estimator",
    "InputEstimator",
    "GradientEstimator",
    "LayerCurves",
    "SensitivityContext",
    "register_estimator",
    "get_estimator",
    "ESTIMATORS",
]


@dataclass
class LayerCurves:
    """One layer's result: ``errors`` is (out_features, n_bits); ``metrics`` per channel."""

    errors: np.ndarray
    metrics: dict[str, np.ndarray]


@dataclass
class SensitivityContext:
    """Everything an estimator may use. ``batch`` is the whole (N, L) calibration batch on the
    CPU; :meth:`micro_batches` yields this process's share of it."""

    model: nn.Module
    targets: list[Target]
    batch: torch.Tensor
    bits: list[int]
    group_size: int
    micro_batch: int = 8
    show_progress: bool = True
    dist: Dist = field(default_factory=Dist)
    seed: int = 0
    probes: int = 8
    checkpointing: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_micro(self) -> int:
        return (self.batch.shape[0] + self.micro_batch - 1) // self.micro_batch

    def micro_batches(self) -> list[tuple[int, torch.Tensor]]:
        """(j, batch[j*m:(j+1)*m]) for the micro-batches this rank owns, in order."""
        m = self.micro_batch
        return [(j, self.batch[j * m : (j + 1) * m]) for j in range(self.n_micro) if self.dist.owns(j)]

    @property
    def n_tokens_predicted(self) -> int:
        """Next-token predictions in the whole calibration batch (all ranks)."""
        return self.batch.shape[0] * (self.batch.shape[1] - 1)


class Estimator(ABC):
    name: str = ""
    #: True when the curves already predict the calibration-loss increase.
    loss_units: bool = False
    #: figures an estimator reports about its last run (e.g. Hutchinson's standard errors)
    summary: dict | None = None


class InputEstimator(Estimator):
    #: "diag": mean of x_j^2 per input column; "full": mean of x x^T
    input_stats: str = "diag"

    @abstractmethod
    def layer_curves(
        self, target: Target, weight: torch.Tensor, stats: torch.Tensor, bits: list[int], group_size: int
    ) -> LayerCurves:
        """Curves of one layer from its weight and input statistics (float64, on the weight's device)."""

    def combine(self, a: LayerCurves, b: LayerCurves, bits: list[int]) -> LayerCurves:
        """Curves of one weight used twice (a tied embedding and lm_head): the errors add."""
        return LayerCurves(errors=a.errors + b.errors, metrics={k: a.metrics[k] + b.metrics[k] for k in a.metrics})


class GradientEstimator(Estimator):
    @abstractmethod
    def estimate(self, ctx: SensitivityContext) -> dict[str, LayerCurves]:
        """Curves for every target (summed over all ranks), keyed by layer name."""


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise BitsearchError(f"unknown estimator '{name}' (choose from {', '.join(sorted(ESTIMATORS))})") from None
