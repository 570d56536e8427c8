"""Exporters: write a planned model in the files a runtime loads (found through a registry)."""

from . import compressed_tensors as _compressed_tensors  # noqa: F401  (registers)
from . import gguf as _gguf  # noqa: F401  (registers)
from . import gptq as _gptq  # noqa: F401  (registers)
from . import packed as _packed  # noqa: F401  (registers)
from .base import EXPORTERS, Exporter, get_exporter, register_exporter

__all__ = ["EXPORTERS", "Exporter", "get_exporter", "register_exporter"]
