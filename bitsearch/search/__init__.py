"""Allocators: choose a width per channel under a byte budget."""

from . import greedy as _greedy  # noqa: F401  (registers)
from . import ilp as _ilp  # noqa: F401  (registers)
from . import uniform as _uniform  # noqa: F401  (registers)
from . import waterfill as _waterfill  # noqa: F401  (registers)
from .base import ALLOCATORS, Allocator, get_allocator, register_allocator
from .problem import AllocationProblem, build_problem

__all__ = ["ALLOCATORS", "Allocator", "get_allocator", "register_allocator", "AllocationProblem", "build_problem"]
