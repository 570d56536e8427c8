"""Allocators: choose a width per channel under a byte budget."""

from . import diffq as _diffq  # noqa: F401  (registers)
from . import greedy as _greedy  # noqa: F401  (registers)
from . import ilp as _ilp  # noqa: F401  (registers)
from . import optuna_study as _optuna  # noqa: F401  (registers)
from . import uniform as _uniform  # noqa: F401  (registers)
from . import waterfill as _waterfill  # noqa: F401  (registers)
from .base import ALLOCATORS, AllocationContext, Allocator, allocator_from_config, get_allocator, register_allocator
from .problem import AllocationProblem, build_problem

__all__ = [
    "ALLOCATORS",
    "AllocationContext",
    "Allocator",
    "allocator_from_config",
    "get_allocator",
    "register_allocator",
    "AllocationProblem",
    "build_problem",
]
