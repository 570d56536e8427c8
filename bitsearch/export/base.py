"""The exporter contract and its registry: one class per output format a runtime loads.

An exporter writes a model quantized by a plan in the files of one runtime (bitsearch's own packed
checkpoint, GGUF for llama.cpp, compressed-tensors for vLLM and transformers, ...). Formats whose
runtime stores one scheme per tensor or per module declare ``plan_unit`` so that a per-channel plan
is refused with a line that says which plan to make instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from ..errors import BitsearchError

__all__ = ["Exporter", "EXPORTERS", "register_exporter", "get_exporter"]


class Exporter(ABC):
    #: the ``--format`` name
    name: str = ""
    #: one line for ``--help``
    description: str = ""
    #: the finest unit the format stores one scheme for: "channel", "tensor" or "module"
    plan_unit: str = "channel"
    #: what ``out`` is: a "file" (e.g. one GGUF) or a "folder" (a checkpoint)
    writes: str = "folder"
    #: modules the format needs beyond bitsearch's own dependencies (an optional extra)
    requires: tuple[str, ...] = ()
    #: ExportConfig fields passed to the constructor (format-specific options)
    config_options: tuple[str, ...] = ()
    #: widths a per-module format stores (None: every width of bitsearch's grid, and 16)
    widths: tuple[int, ...] | None = None

    def module_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        """Bytes the format stores for one module at one width (formats with ``plan_unit`` "module")."""
        raise BitsearchError(f"format '{self.name}' has no per-module price")

    @abstractmethod
    def export(self, model: nn.Module, tokenizer, plan, out: str) -> dict:
        """Write ``model`` quantized by ``plan`` to ``out``; return what was written (paths, bytes)."""


EXPORTERS: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    EXPORTERS[cls.name] = cls
    return cls


def get_exporter(name: str, **options) -> Exporter:
    """An exporter by ```format``` name; ``options`` go to its constructor."""
    try:
        cls = EXPORTERS[name]
    except KeyError:
        raise BitsearchError(f"unknown export format '{name}' (choose from {', '.join(sorted(EXPORTERS))})") from None
    return cls(**options)
