"""The finalizer contract and its registry.

A finalizer turns a float model and a plan into the packed model of that plan (its targets become
``PackedLinear`` / ``PackedEmbedding`` modules, exactly the plan's bytes): by learned rounding
(a *rounder*: its scales and zeros, possibly with rounded weights, are packed) or by training
(QAT, which may start from a rounder's result: ``init``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..errors import BitsearchError

__all__ = ["Finalizer", "Rounder", "FINALIZERS", "register_finalizer", "get_finalizer", "rounders"]


class Finalizer(ABC):
    #: the ``method`` name
    name: str = ""

    def check(self, config, checkpoint: str | None = None) -> None:
        """Refuse bad options (one line) before any model or text is loaded."""

    @abstractmethod
    def finalize(
        self,
        model: nn.Module,
        plan,
        batch: torch.Tensor,
        config,
        show_progress: bool = True,
        checkpoint: str | None = None,
    ) -> dict:
        """Quantize ``model`` in place under ``plan`` (targets packed) on the token ``batch``
        (``config``: a :class:`bitsearch.config.FinalizeConfig`); a finalizer that can be resumed keeps
        its state in the file ``checkpoint``. Returns a record for the plan's provenance."""


class Rounder(Finalizer):
    """A finalizer that only chooses the rounding: its ``round`` gives {layer: (scales, zeros)} for the
    weights it leaves in the model, which are then packed (and can start QAT)."""

    @abstractmethod
    def round(self, model: nn.Module, plan, batch: torch.Tensor, config, show_progress: bool = True) -> dict:
        """{layer: (scales, zeros)}; the model's target weights are left at their rounded values."""

    def finalize(self, model, plan, batch, config, show_progress=True, checkpoint=None) -> dict:
        from ..quantize import pack_model

        pack_model(model, plan, self.round(model, plan, batch, config, show_progress))
        return {}


FINALIZERS: dict[str, type[Finalizer]] = {}


def register_finalizer(cls: type[Finalizer]) -> type[Finalizer]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    FINALIZERS[cls.name] = cls
    return cls


def get_finalizer(name: str) -> Finalizer:
    try:
        return FINALIZERS[name]()
    except KeyError:
        raise BitsearchError(
            f"unknown finalize method '{name}' (choose from {', '.join(sorted(FINALIZERS))})"
        ) from None


def rounders() -> list[str]:
    """Names of the registered rounders (each can start QAT as its ``init``)."""
    return sorted(n for n, c in FINALIZERS.items() if issubclass(c, Rounder))
