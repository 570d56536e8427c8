"""SensitivityTable: one row per target layer x channel, with error curves e_c(b).

Columns: ``layer`` (module name), ``channel`` (output row), ``in_features``, estimator
metrics (e.g. ``imatrix_sum``), and one column ``e{b}`` per width b of the menu holding the
predicted loss increase when that channel alone is stored at b bits (b = 0: pruned).
Metadata (group size, menu, estimator, calibration, model fingerprint, units) is stored in
the Parquet schema, so a table can be checked against the search that uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..errors import BitsearchError

__all__ = ["SensitivityTable", "TABLE_FORMAT", "TABLE_VERSION", "err_col"]

TABLE_FORMAT = "bitsearch-sensitivity"
TABLE_VERSION = 1
_META_KEY = b"bitsearch"


def err_col(bits: int) -> str:
    return f"e{bits}"


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
    def layers(self) -> list[str]:
        return list(dict.fromkeys(self.df["layer"]))

    def curves(self, layer: str | None = None) -> np.ndarray:
        """(n_channels, n_bits) error matrix, rows in table order (of one layer if given)."""
        df = self.df if layer is None else self.df[self.df["layer"] == layer]
        return df[[err_col(b) for b in self.bits]].to_numpy(dtype=np.float64)

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
        if meta.get("version") != TABLE_VERSION:
            raise BitsearchError(f"sensitivity table '{path}' has version {meta.get('version')}, "
                                 f"this bitsearch reads version {TABLE_VERSION}")
        df = tbl.to_pandas()
        missing = [err_col(b) for b in meta["bits"] if err_col(b) not in df.columns]
        if missing:
            raise BitsearchError(f"sensitivity table '{path}' lacks columns {', '.join(missing)}")
        return cls(df=df, meta=meta)
