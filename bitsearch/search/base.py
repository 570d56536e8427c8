"""The allocator contract and its registry.

An allocator chooses a width per channel under a byte budget. Most read only the predicted
error curves (``AllocationProblem``); model-in-the-loop allocators (``needs_model = True``: optuna,
diffq) also measure candidate plans on the model, which they find in the ``AllocationContext``
that ``bitsearch.search`` gives them. Every allocator is built from the search's config by
``from_config``, so its options are declared once (``bitsearch.config.SearchConfig``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BitsearchError
from .problem import AllocationProblem

__all__ = [
    "Allocator",
    "AllocationContext",
    "ALLOCATORS",
    "register_allocator",
    "get_allocator",
    "allocator_from_config",
]


@dataclass
class AllocationContext:
    """What a model-in-the-loop allocator measures plans with."""

    model: Any  # the float model (nn.Module)
    targets: list  # its target layers (models.Target)
    batch: Any  # (N, T) token ids the candidates are measured or trained on
    validation: Any = None  # (N', T) held-out token ids that choose among the candidates
    table: Any = None  # the SensitivityTable the problem came from
    fingerprint: dict = field(default_factory=dict)
    out: str | None = None  # the plan file, if any (optuna keeps its study next to it)
    estimator_problems: dict | None = None  # {estimator: problem} when the estimators' weights may be tuned
    micro_batch: int = 8
    show_progress: bool = True


class Allocator(ABC):
    name: str = ""
    #: True: ``allocate`` runs the model (``self.context`` is set before it is called)
    needs_model: bool = False
    context: AllocationContext | None = None

    @classmethod
    def from_config(cls, config) -> "Allocator":
        """The allocator with the options of a :class:`bitsearch.config.SearchConfig`."""
        return cls()

    @abstractmethod
    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        """Index into ``problem.bits`` per channel, with ``problem.bytes_of(choice) <= budget_bytes``."""


ALLOCATORS: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


def _cls(name: str) -> type[Allocator]:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise BitsearchError(f"unknown search method '{name}' (choose from {', '.join(sorted(ALLOCATORS))})") from None


def get_allocator(name: str, **options) -> Allocator:
    """An allocator by name; ``options`` go to its constructor (e.g. ilp's granularity)."""
    return _cls(name)(**options)


def allocator_from_config(config) -> Allocator:
    """The allocator ``config.method`` with its options from ``config`` (a SearchConfig)."""
    return _cls(config.method).from_config(config)
