"""bitsearch's own packed checkpoint as an export format: per-channel widths, loaded by
``bitsearch.load_model`` (its targets become ``PackedLinear`` modules)."""

from __future__ import annotations

from ..io.checkpoint import packed_tensor_bytes, save_packed
from .base import Exporter, register_exporter

__all__ = ["PackedExporter"]


@register_exporter
class PackedExporter(Exporter):
    name = "packed"
    description = "bitsearch's packed checkpoint (any plan, per-channel widths)"
    plan_unit = "channel"

    def export(self, model, tokenizer, plan, out: str) -> dict:
        save_packed(model, plan, out, tokenizer)
        return {"out": out, "bytes": packed_tensor_bytes(out)}
