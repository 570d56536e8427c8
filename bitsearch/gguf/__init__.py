"""GGUF for llama.cpp: ggml types and prices, llama.cpp's quantizers (ctypes), per-tensor plans and
their search, imatrix files, and reading GGUF files back (the writer is ``bitsearch.export.gguf``).

Needs the ``gguf`` extra (``gguf`` and ``llama-cpp-python``) to quantize, read or write files;
:mod:`.types` and :mod:`.plan` are pure Python.
"""

from .plan import TensorPlan
from .types import GGML_TYPES, SEARCH_TYPES, effective_type, ggml_type, tensor_bytes

__all__ = ["TensorPlan", "GGML_TYPES", "SEARCH_TYPES", "effective_type", "ggml_type", "tensor_bytes"]
