"""Coupled pruning: rows of some layers whose removal frees columns of another.

A *coupling* ties the output rows of *producer* layers to the input columns of a *consumer*:

- MLP (gate/up -> down, e.g. Llama, Qwen2, Mistral): unit j is row j of gate_proj and of
  up_proj; its activation h_j = act(gate_j . x) * (up_j . x) is exactly 0 when either row is 0,
  so down_proj's column j then multiplies zeros.
- Attention (q/k/v -> o): unit g is a key-value head group: the rows of its n_rep query heads in
  q_proj, of its key head in k_proj and of its value head in v_proj; with its value rows zero the
  group's heads output exactly 0 (attention weights sum to 1 times zero values), so o_proj's
  columns of those query heads multiply zeros. Whole groups keep the q/kv head ratio, so the
  model's own attention code runs unchanged on the smaller matrices.

A unit is *dead* when all its producer rows are at width 0. Dead units' consumer columns are
removed: the consumer is stored (and quantized, groups of G running over the live columns
only) with K' = K - dead columns, and the producers' pruned rows are dropped from their
outputs. Couplings are found only where removal is exact: producers without bias (a biased
pruned row would output a constant), every layer of the coupling a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

__all__ = [
    "Coupling",
    "find_couplings",
    "consumer_in_features",
    "live_columns",
    "couplings_from_list",
    "physical_layout",
]


@dataclass(frozen=True)
class Coupling:
    kind: str  # "mlp" | "attention"
    producers: tuple[str, ...]  # layers whose rows form the units
    consumer: str  # layer whose columns the units free
    unit_rows: tuple[int, ...]  # rows of each producer per unit
    unit_cols: int  # consumer columns per unit
    n_units: int

    def rows(self, p: int, unit: int) -> slice:
        return slice(unit * self.unit_rows[p], (unit + 1) * self.unit_rows[p])

    def unit_index(self, p: int) -> np.ndarray:
        """The unit of each row of producer ``p``."""
        return np.repeat(np.arange(self.n_units), self.unit_rows[p])

    def dead_units(self, bits: dict[str, np.ndarray]) -> np.ndarray:
        """(n_units,) bool: every producer row of the unit at width 0."""
        dead = np.ones(self.n_units, dtype=bool)
        for p, name in enumerate(self.producers):
            dead &= (np.asarray(bits[name]).reshape(self.n_units, self.unit_rows[p]) == 0).all(axis=1)
        return dead

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "producers": list(self.producers),
            "consumer": self.consumer,
            "unit_rows": list(self.unit_rows),
            "unit_cols": self.unit_cols,
            "n_units": self.n_units,
        }


def couplings_from_list(items: list[dict] | None) -> list[Coupling]:
    return [
        Coupling(
            kind=d["kind"],
            producers=tuple(d["producers"]),
            consumer=d["consumer"],
            unit_rows=tuple(int(r) for r in d["unit_rows"]),
            unit_cols=int(d["unit_cols"]),
            n_units=int(d["n_units"]),
        )
        for d in (items or [])
    ]


def _linear(mod: nn.Module, attr: str) -> nn.Linear | None:
    sub = getattr(mod, attr, None)
    return sub if isinstance(sub, nn.Linear) else None


def find_couplings(model: nn.Module, target_names) -> list[Coupling]:
    """The exact couplings among ``target_names`` (see the module docstring)."""
    names = set(target_names)
    out = []
    for prefix, mod in model.named_modules():
        full = (prefix + ".") if prefix else ""
        gate, up, down = _linear(mod, "gate_proj"), _linear(mod, "up_proj"), _linear(mod, "down_proj")
        if gate is not None and up is not None and down is not None:
            layers = (full + "gate_proj", full + "up_proj", full + "down_proj")
            if (
                set(layers) <= names
                and gate.bias is None
                and up.bias is None
                and gate.out_features == up.out_features == down.in_features
            ):
                out.append(Coupling("mlp", layers[:2], layers[2], (1, 1), 1, gate.out_features))
        q, k, v, o = (_linear(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        head_dim = getattr(mod, "head_dim", None)
        if None in (q, k, v, o) or not isinstance(head_dim, int):
            continue
        layers = tuple(full + a for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if not set(layers) <= names or any(m.bias is not None for m in (q, k, v)):
            continue
        n_kv = k.out_features // head_dim
        if (
            n_kv < 1
            or k.out_features != n_kv * head_dim
            or v.out_features != k.out_features
            or q.out_features % (n_kv * head_dim)
            or o.in_features != q.out_features
        ):
            continue
        q_rows = q.out_features // n_kv
        out.append(Coupling("attention", layers[:3], layers[3], (q_rows, head_dim, head_dim), q_rows, n_kv))
    return out


def live_columns(coupling: Coupling, bits: dict[str, np.ndarray]) -> np.ndarray:
    """(K,) bool: the consumer's columns that stay."""
    return np.repeat(~coupling.dead_units(bits), coupling.unit_cols)


def consumer_in_features(
    couplings: list[Coupling], shapes: dict[str, tuple[int, int]], bits: dict[str, np.ndarray]
) -> dict[str, int]:
    """Stored input width of every consumer: K minus its dead units' columns."""
    return {c.consumer: shapes[c.consumer][1] - c.unit_cols * int(c.dead_units(bits).sum()) for c in couplings}


def physical_layout(
    couplings: list[Coupling], bits: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({producer: rows that stay}, {consumer: columns that stay}) for the couplings of a plan
    that have dead units: a dead unit's rows and columns go."""
    rows, columns = {}, {}
    for c in couplings:
        dead = c.dead_units(bits)
        if dead.any():
            for p, name in enumerate(c.producers):
                rows[name] = np.repeat(~dead, c.unit_rows[p])
            columns[c.consumer] = live_columns(c, bits)
    return rows, columns
