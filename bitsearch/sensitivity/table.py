"""SensitivityTable: one row per target layer x channel, with error curves e_c(b) from one or
more estimators.

Columns: ``layer`` (module name), ``channel`` (output row), ``in_features``, and per estimator
``{est}.e{b}`` for every width b of the menu (the predicted calibration-loss increase when that
channel alone is stored at b bits; b = 0: pruned) plus its metrics ``{est}.{metric}`` (e.g.
``snr.signal``, ``hutchinson.trace``). Metadata (menu, group size, estimators and how each was
calibrated, default mix, model fingerprint, units) is stored in the Parquet schema, so a table
can be checked against the search that uses it.

A *mix* combines estimators' curves: e_c(b) = sum_k w_k e^k_c(b) (all in loss units). Written
``imatrix=0.7,fisher=0.3`` or just ``snr``; a table's default mix is its ``meta["mix"]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..errors import BitsearchError

__all__ = ["SensitivityTable", "TABLE_FORMAT", "TABLE_VERSION", "err_col", "parse_mix", "format_mix"]

TABLE_FORMAT = "bitsearch-sensitivity"
TABLE_VERSION = 2
_META_KEY = b"bitsearch"


def err_col(bits: int, estimator: str) -> str:
    return f"{estimator}.e{bits}"


def parse_mix(mix: str | dict | None, available: list[str]) -> dict[str, float] | None:
    """``"imatrix=0.7,fisher=0.3"`` / ``"snr"`` / a dict -> {estimator: weight}; checked."""
    if mix is None:
        return None
    if isinstance(mix, str):
        out: dict[str, float] = {}
        for part in (p.strip() for p in mix.split(",")):
            if not part:
                continue
            name, _, w = part.partition("=")
            try:
                out[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise BitsearchError(f"`mix` '{mix}': weight '{w}' of '{name}' is not a number") from None
        mix = out
    if not mix:
        raise BitsearchError("the estimator mix is empty")
    for name, w in mix.items():
        if name not in available:
            raise BitsearchError(f"mix names estimator '{name}', which the table lacks (it has {', '.join(available)})")
        if not np.isfinite(w) or w < 0:
            raise BitsearchError(f"mix weight of '{name}' must be a finite number >= 0 (got {w})")
    if sum(mix.values()) <= 0:
        raise BitsearchError("mix weights are all zero")
    return {k: float(v) for k, v in mix.items()}


def format_mix(mix: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in mix.items())


@dataclass
class SensitivityTable:
    """Per-channel error curves plus the settings they were computed under."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def bits(self) -> list[int]:
        return list(self.meta["bits"])

    @property
    def group_size(self) -> int:
        return int(self.meta["group_size"])

    @property
    def estimators(self) -> list[str]:
        return list(self.meta["estimators"])

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(self.df["layer"]))

    @property
    def default_mix(self) -> dict[str, float]:
        return dict(self.meta.get("mix") or {self.estimators[0]: 1.0})

    def resolve_mix(self, mix: str | dict | None = None) -> dict[str, float]:
        return parse_mix(mix, self.estimators) or self.default_mix

    def curves(
        self, layer: str | None = None, mix: str | dict | None = None, bits: list[int] | None = None
    ) -> np.ndarray:
        """(n_channels, n_bits) error matrix of a mix (default: the table's), rows in table
        order (of one layer if given), columns for ``bits`` (default: the table's menu)."""
        df = self.df if layer is None else self.df[self.df["layer"] == layer]
        bits = self.bits if bits is None else bits
        out = np.zeros((len(df), len(bits)))
        for est, w in self.resolve_mix(mix).items():
            if w:
                out += w * df[[err_col(b, est) for b in bits]].to_numpy(dtype=np.float64)
        return out

    @classmethod
    def merge(cls, tables: list["SensitivityTable"], mix: str | dict | None = None) -> "SensitivityTable":
        """One table holding the estimators of several tables computed for the same targets, menu
        and group size (e.g. estimators timed one at a time); default mix: equal weights."""
        first = tables[0]
        df = first.df.copy()
        names = list(first.estimators)
        info = dict(first.meta.get("estimator_info", {}))
        for t in tables[1:]:
            if t.bits != first.bits or t.group_size != first.group_size:
                raise BitsearchError("cannot merge sensitivity tables with different menus or group sizes")
            if (
                not (t.df["layer"].to_numpy() == df["layer"].to_numpy()).all()
                or not (t.df["channel"].to_numpy() == df["channel"].to_numpy()).all()
            ):
                raise BitsearchError("cannot merge sensitivity tables over different channels")
            dup = [e for e in t.estimators if e in names]
            if dup:
                raise BitsearchError(f"estimator '{dup[0]}' appears in two of the tables to merge")
            for c in t.df.columns:
                if c.split(".", 1)[0] in t.estimators:
                    df[c] = t.df[c].to_numpy()
            names += t.estimators
            info.update(t.meta.get("estimator_info", {}))
        default = parse_mix(mix, names) or {n: 1.0 / len(names) for n in names}
        units = {i.get("units") for i in info.values()}
        meta = dict(
            first.meta,
            estimators=names,
            estimator_info=info,
            mix=default,
            mix_text=format_mix(default),
            units=units.pop() if len(units) == 1 else "mixed: see estimator_info",
        )
        return cls(df=df, meta=meta)

    def metric(self, estimator: str, name: str) -> np.ndarray | None:
        col = f"{estimator}.{name}"
        return self.df[col].to_numpy() if col in self.df.columns else None

    def save(self, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = dict(self.meta, format=TABLE_FORMAT, version=TABLE_VERSION)
        tbl = pa.Table.from_pandas(self.df, preserve_index=False)
        tbl = tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(tbl, tmp)

    @classmethod
    def load(cls, path: str) -> "SensitivityTable":
        import pyarrow.parquet as pq

        if not os.path.isfile(path):
            raise BitsearchError(f"sensitivity table '{path}' does not exist")
        try:
            tbl = pq.read_table(path)
        except Exception as exc:
            raise BitsearchError(f"sensitivity table '{path}' is not a readable Parquet file ({exc})") from None
        raw = (tbl.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise BitsearchError(f"'{path}' is a Parquet file but not a bitsearch sensitivity table")
        meta = json.loads(raw)
        if meta.get("format") != TABLE_FORMAT:
            raise BitsearchError(f"'{path}' is not a bitsearch sensitivity table (format {meta.get('format')!r})")
        df = tbl.to_pandas()
        if meta.get("version") == 1:  # one estimator, columns e{b} and bare metric names
            est = meta["estimator"]
            keep = {"layer", "channel", "in_features"}
            df = df.rename(columns={c: f"{est}.{c}" for c in df.columns if c not in keep})
            meta = dict(
                meta,
                version=TABLE_VERSION,
                estimators=[est],
                mix={est: 1.0},
                estimator_info={est: {"calibration": meta.get("calibration"), "units": meta.get("units")}},
            )
        elif meta.get("version") != TABLE_VERSION:
            raise BitsearchError(
                f"sensitivity table '{path}' has version {meta.get('version')}, "
                f"this bitsearch reads versions 1 and {TABLE_VERSION}"
            )
        missing = [err_col(b, e) for e in meta["estimators"] for b in meta["bits"] if err_col(b, e) not in df.columns]
        if missing:
            raise BitsearchError(f"sensitivity table '{path}' lacks columns {', '.join(missing)}")
        return cls(df=df, meta=meta)
