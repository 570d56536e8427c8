"""BitPlan: the versioned JSON file that says how many bits each channel gets.

Layout (format "bitsearch-plan", version 1)::

    {"format": "bitsearch-plan", "version": 1,
     "model": {"model_type", "sha256", "targets": {name: [out, in]}},
     "quantizer": {"scheme": "asym-minmax", "group_size": G, "bits": [menu], "scale_dtype": "float16"},
     "bits": {name: "4433...0F"},      # one character per channel: 0-8, F = 16 (kept in fp16)
     "couplings": [{"kind", "producers", "consumer", "unit_rows", "unit_cols", "n_units"}],
                                       # version 2 only: coupled pruning (see couplings.py)
     "summary": {"avg_bits", "bytes", "n_weights", "n_channels", "predicted_error", "histogram"},
     "provenance": {"command", "estimator", "allocator", "budget", "calibration", "seed",
                    "package_version", "time"}}

Version 1 plans have no couplings; a plan with couplings is written as version 2 (its bytes
count the consumers' freed columns, which a version-1 reader would not). Loading checks
everything and names the first problem it finds. Writing is atomic.

Per-tensor plans (one ggml type per tensor, for GGUF) are version 3 with ``"unit": "tensor"``
(:class:`bitsearch.gguf.plan.TensorPlan`); :func:`bitsearch.inputs.load_plan` reads either kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..atomic import write_text_atomic
from ..cost import avg_bits, plan_bytes
from ..couplings import Coupling, couplings_from_list
from ..errors import BitsearchError
from ..quant.grid import KEEP_WIDTH, VALID_WIDTHS

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PlanTargets", "BitPlan", "encode_bits", "decode_bits"]

PLAN_FORMAT = "bitsearch-plan"
PLAN_VERSION = 2
_READS = (1, 2)
_CHARS = {b: str(b) for b in VALID_WIDTHS if b != KEEP_WIDTH}
_CHARS[KEEP_WIDTH] = "F"
_WIDTH_OF = {c: b for b, c in _CHARS.items()}


def encode_bits(bits: np.ndarray) -> str:
    return "".join(_CHARS[int(b)] for b in bits)


def decode_bits(text: str, where: str) -> np.ndarray:
    try:
        return np.array([_WIDTH_OF[c] for c in text], dtype=np.uint8)
    except KeyError as exc:
        raise BitsearchError(f"{where}: width code {exc.args[0]!r} is not a valid width (0-8 or F for 16)") from None


class PlanTargets:
    """What every plan file knows of its model (``self.model``): target shapes and fingerprint."""

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: (int(v[0]), int(v[1])) for k, v in self.model["targets"].items()}

    def n_weights(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    def check_stated_bytes(self, where: str, what: str) -> None:
        """Refuse a file whose summary's bytes differ from what its ``what`` (widths, types) cost."""
        stated = self.summary.get("bytes")
        if stated is not None and stated != self.n_bytes():
            raise BitsearchError(
                f"plan '{where}': its summary says {stated} bytes but its {what} cost "
                f"{self.n_bytes()} (edited or corrupt file)"
            )

    def check_fingerprint(self, fingerprint: dict, where: str = "plan", force: bool = False) -> None:
        """Raise unless the plan was made for a model with this fingerprint (with ``force``: of the
        same shapes, whatever its weights)."""
        if self.model.get("sha256") != fingerprint["sha256"]:
            raise BitsearchError(
                f"{where} was made for another model ({self.model.get('model_type')}, "
                f"fingerprint {str(self.model.get('sha256'))[:12]}) than this one "
                f"({fingerprint.get('model_type')}, {fingerprint['sha256'][:12]})"
            )
        mine, theirs_w = self.model.get("weights_sha256"), fingerprint.get("weights_sha256")
        if not force and mine and theirs_w and mine != theirs_w:
            raise BitsearchError(
                f"{where} was made for a model of the same shapes but other weights (weights "
                f"digest {mine[:12]}, this model's {theirs_w[:12]}): pass `force` to apply it anyway"
            )


@dataclass
class BitPlan(PlanTargets):
    model: dict
    group_size: int
    menu: list[int]
    bits: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    scheme: str = "asym-minmax"
    couplings: list[Coupling] = field(default_factory=list)

    # ---- derived -------------------------------------------------------------------------
    @property
    def avg_bits(self) -> float:
        """Avg bits all-in of the plan's targets (codes, scales, zeros, bit map)."""
        return avg_bits(self.n_bytes(), self.n_weights())

    def n_bytes(self) -> int:
        return plan_bytes(self.shapes, self.bits, self.group_size, self.couplings)

    def dead_units(self) -> int:
        return int(sum(int(c.dead_units(self.bits).sum()) for c in self.couplings))

    def histogram(self) -> dict[str, int]:
        allb = np.concatenate(list(self.bits.values()))
        w, c = np.unique(allb, return_counts=True)
        return {str(int(a)): int(b) for a, b in zip(w, c)}

    def fill_summary(self, predicted_error: float | None = None) -> None:
        n_bytes = self.n_bytes()
        self.summary = {
            "avg_bits": avg_bits(n_bytes, self.n_weights()),
            "bytes": n_bytes,
            "n_weights": self.n_weights(),
            "n_channels": int(sum(len(b) for b in self.bits.values())),
            "pruned_channels": int(sum(int((b == 0).sum()) for b in self.bits.values())),
            "dead_units": self.dead_units(),
            "predicted_error": predicted_error,
            "histogram": self.histogram(),
        }

    # ---- file ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION if self.couplings else 1,
            "model": self.model,
            "quantizer": {
                "scheme": self.scheme,
                "group_size": self.group_size,
                "bits": list(self.menu),
                "scale_dtype": "float16",
            },
            "bits": {k: encode_bits(v) for k, v in self.bits.items()},
        }
        if self.couplings:
            d["couplings"] = [c.to_dict() for c in self.couplings]
        d["summary"] = self.summary
        d["provenance"] = self.provenance
        return d

    def save(self, path: str) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str) -> "BitPlan":
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "BitPlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise BitsearchError(
                f"'{where}' is not a bitsearch plan (format {d.get('format') if isinstance(d, dict) else None!r})"
            )
        if d.get("unit") == "tensor":
            raise BitsearchError(
                f"'{where}' is a per-tensor plan of ggml types: export it with --format gguf "
                f"(the packed format needs a per-channel plan from `bitsearch search`)"
            )
        if d.get("version") not in _READS:
            raise BitsearchError(
                f"plan '{where}' has format version {d.get('version')}; "
                f"this bitsearch reads versions {', '.join(map(str, _READS))}"
            )
        shapes = plan_sections(d, ("model", "quantizer", "bits"), where)
        q = d["quantizer"]
        menu = q.get("bits")
        if not isinstance(menu, list) or any(b not in VALID_WIDTHS for b in menu):
            raise BitsearchError(f"plan '{where}': bit menu {menu} has a width outside {list(VALID_WIDTHS)}")
        if q.get("scheme", "asym-minmax") != "asym-minmax":
            raise BitsearchError(f"plan '{where}': unknown quantizer scheme {q.get('scheme')!r}")
        gs = q.get("group_size")
        if not isinstance(gs, int) or (gs != -1 and gs < 1):
            raise BitsearchError(f"plan '{where}': group size {gs!r} is not -1 or a positive integer")
        bits = {}
        for name, text in d["bits"].items():
            if name not in shapes:
                raise BitsearchError(f"plan '{where}': layer '{name}' has bits but is not among its targets")
            arr = decode_bits(text, f"plan '{where}', layer '{name}'")
            if len(arr) != shapes[name][0]:
                raise BitsearchError(
                    f"plan '{where}': layer '{name}' has {len(arr)} widths for {shapes[name][0]} channels"
                )
            bad = sorted(set(arr.tolist()) - set(menu))
            if bad:
                ch = int(np.flatnonzero(arr == bad[0])[0])
                raise BitsearchError(
                    f"plan '{where}': layer '{name}' channel {ch} has width {bad[0]}, outside the menu {menu}"
                )
            bits[name] = arr
        missing = [n for n in shapes if n not in bits]
        if missing:
            raise BitsearchError(f"plan '{where}': target '{missing[0]}' has no bits")
        try:
            couplings = couplings_from_list(d.get("couplings"))
        except (KeyError, TypeError, ValueError):
            raise BitsearchError(f"plan '{where}': its couplings section is malformed") from None
        for c in couplings:
            layers = c.producers + (c.consumer,)
            bad = [n for n in layers if n not in shapes]
            if bad:
                raise BitsearchError(f"plan '{where}': coupling names '{bad[0]}', not one of its targets")
            if (
                any(shapes[n][0] != c.n_units * r for n, r in zip(c.producers, c.unit_rows))
                or shapes[c.consumer][1] != c.n_units * c.unit_cols
            ):
                raise BitsearchError(f"plan '{where}': coupling of '{c.consumer}' does not fit the layer shapes")
        plan = cls(
            model=d["model"],
            group_size=gs,
            menu=list(menu),
            bits=bits,
            summary=d.get("summary") or {},
            provenance=d.get("provenance") or {},
            couplings=couplings,
        )
        plan.check_stated_bytes(where, "widths")
        return plan

    # ---- model check -----------------------------------------------------------------------
    def check_model(self, fingerprint: dict, where: str = "plan", force: bool = False) -> None:
        """Raise unless the plan was made for a model with this fingerprint (with ``force``, a model
        of the same config and shapes whose weights differ is accepted)."""
        theirs = fingerprint["targets"]
        for name, shape in self.shapes.items():
            if name not in theirs:
                raise BitsearchError(
                    f"{where}: layer '{name}' is not a target layer of this model "
                    f"(plan for another model or other `targets`?)"
                )
            if tuple(theirs[name]) != shape:
                raise BitsearchError(
                    f"{where}: layer '{name}' is {shape[0]}x{shape[1]} in the plan but "
                    f"{theirs[name][0]}x{theirs[name][1]} in the model"
                )
        self.check_fingerprint(fingerprint, where, force)


def plan_sections(d: dict, keys: tuple[str, ...], where: str) -> dict:
    """Check that a plan file has these sections; return its target shapes."""
    for key in keys:
        if not isinstance(d.get(key), dict):
            raise BitsearchError(f"plan '{where}' lacks its '{key}' section")
    shapes = d["model"].get("targets")
    if not isinstance(shapes, dict):
        raise BitsearchError(f"plan '{where}': model section has no target shapes")
    return shapes


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise BitsearchError(f"plan file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise BitsearchError(
            f"plan file '{path}' is truncated or not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise BitsearchError(f"plan file '{path}' is not a text file") from None
