"""The allocator contract and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import BitsearchError
from .problem import AllocationProblem

__all__ = ["Allocator", "ALLOCATORS", "register_allocator", "get_allocator"]


class Allocator(ABC):
    name: str = ""

    @abstractmethod
    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        """Index into ``problem.bits`` per channel, with ``problem.bytes_of(choice) <= budget_bytes``."""


ALLOCATORS: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


def get_allocator(name: str, **options) -> Allocator:
    """An allocator by name; ``options`` go to its constructor (e.g. ilp's granularity)."""
    try:
        cls = ALLOCATORS[name]
    except KeyError:
        raise BitsearchError(f"unknown search method '{name}' (choose from {', '.join(sorted(ALLOCATORS))})") from None
    return cls(**options)
