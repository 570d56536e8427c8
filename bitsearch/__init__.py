"""bitsearch: per-channel bit-width search for LLM quantization under a memory budget."""

__version__ = "0.1.0"

from .errors import BitsearchError  # noqa: E402

__all__ = ["__version__", "BitsearchError"]
