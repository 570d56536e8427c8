"""TensorPlan: a per-tensor plan of ggml types (what a GGUF file stores), in the plan-file family.

Layout (format "bitsearch-plan", version 3, unit "tensor")::

    {"format": "bitsearch-plan", "version": 3, "unit": "tensor",
     "model": {"model_type", "sha256", "targets": {name: [rows, n_per_row]}},
     "quantizer": {"scheme": "ggml", "types": [menu], "imatrix": "FILE", "imatrix_sha256": "..."},
     "types": {name: "Q4_K", ...},            # the type each tensor is stored in (after fallbacks)
     "summary": {"avg_bits", "bytes", "n_weights", "predicted_error", "histogram"},
     "provenance": {...}}

``bytes`` is the exact size of the targets' tensor data in the GGUF file. ``imatrix`` names the
llama.cpp imatrix file (beside the plan) the types were scored and are quantized with. Readers of
versions 1-2 refuse this file by its version; loading checks every type against the ggml types
bitsearch writes and against its tensor's row length.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from ..atomic import write_text_atomic
from ..cost import avg_bits
from ..errors import BitsearchError
from ..io.plan import PlanTargets, plan_sections
from .types import GGML_TYPES, tensor_bytes

__all__ = ["TENSOR_PLAN_VERSION", "TensorPlan", "is_tensor_plan"]

TENSOR_PLAN_VERSION = 3


def is_tensor_plan(d: dict) -> bool:
    return isinstance(d, dict) and d.get("unit") == "tensor"


@dataclass
class TensorPlan(PlanTargets):
    model: dict
    types: dict[str, str]
    menu: list[str]
    imatrix: str | None = None  # file name, relative to the plan's folder
    imatrix_sha256: str | None = None
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    path: str | None = None  # where it was loaded from (to find the imatrix)

    unit = "tensor"

    def n_bytes(self) -> int:
        return sum(tensor_bytes(self.types[n], s) for n, s in self.shapes.items())

    def imatrix_path(self) -> str | None:
        if self.imatrix is None:
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self.imatrix) if self.path else self.imatrix

    def fill_summary(self, predicted_error: float | None = None) -> None:
        n = self.n_bytes()
        self.summary = {
            "avg_bits": avg_bits(n, self.n_weights()),
            "bytes": n,
            "n_weights": self.n_weights(),
            "n_tensors": len(self.types),
            "predicted_error": predicted_error,
            "histogram": dict(sorted(Counter(self.types.values()).items())),
        }

    def to_dict(self) -> dict:
        q = {"scheme": "ggml", "types": list(self.menu)}
        if self.imatrix:
            q.update(imatrix=self.imatrix, imatrix_sha256=self.imatrix_sha256)
        return {
            "format": "bitsearch-plan",
            "version": TENSOR_PLAN_VERSION,
            "unit": "tensor",
            "model": self.model,
            "quantizer": q,
            "types": dict(self.types),
            "summary": self.summary,
            "provenance": self.provenance,
        }

    def save(self, path: str) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        self.path = path

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan", path: str | None = None) -> "TensorPlan":
        if d.get("version") != TENSOR_PLAN_VERSION:
            raise BitsearchError(
                f"per-tensor plan '{where}' has version {d.get('version')}; "
                f"this bitsearch reads version {TENSOR_PLAN_VERSION}"
            )
        shapes = plan_sections(d, ("model", "quantizer", "types"), where)
        q = d["quantizer"]
        if q.get("scheme") != "ggml":
            raise BitsearchError(f"per-tensor plan '{where}': unknown quantizer scheme {q.get('scheme')!r}")
        types = {}
        for name, t in d["types"].items():
            if name not in shapes:
                raise BitsearchError(f"plan '{where}': tensor '{name}' has a type but is not among its targets")
            if t not in GGML_TYPES:
                raise BitsearchError(
                    f"plan '{where}': tensor '{name}' has type {t!r}, not a ggml type bitsearch "
                    f"writes ({', '.join(GGML_TYPES)})"
                )
            n = int(shapes[name][1])
            if n % GGML_TYPES[t].block:
                raise BitsearchError(
                    f"plan '{where}': tensor '{name}' has rows of {n} weights, which {t} "
                    f"(blocks of {GGML_TYPES[t].block}) cannot store"
                )
            types[name] = t
        missing = [n for n in shapes if n not in types]
        if missing:
            raise BitsearchError(f"plan '{where}': target '{missing[0]}' has no type")
        plan = cls(
            model=d["model"],
            types=types,
            menu=list(q.get("types") or []),
            imatrix=q.get("imatrix"),
            imatrix_sha256=q.get("imatrix_sha256"),
            summary=d.get("summary") or {},
            provenance=d.get("provenance") or {},
            path=path,
        )
        plan.check_stated_bytes(where, "types")
        return plan

    def check_model(self, fingerprint: dict, where: str = "plan", force: bool = False) -> None:
        """Raise unless the plan was made for a model with this fingerprint."""
        self.check_fingerprint(fingerprint, where, force)
