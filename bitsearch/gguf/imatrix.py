"""llama.cpp importance-matrix files: read (GGUF and the legacy .dat) and write (GGUF).

An importance matrix holds, per weight tensor (by its GGUF name, e.g. ``blk.0.attn_q.weight``),
the sum over calibration tokens of each input column's squared activation and the token count;
llama.cpp quantizes with ``sums / count``. The GGUF layout is ``llama-imatrix``'s: tensors
``<name>.in_sum2`` (F32, one row per expert) and ``<name>.counts`` (F32), metadata
``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``.
The legacy layout is ``int32 n``; n times (``int32 len, name, int32 ncall, int32 nval,
float32[nval]`` holding the mean times ncall); optionally ``int32 chunks, int32 len, dataset``.
Sums are kept in float32 and counts as integers, so writing and reading back is lossless.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import BitsearchError

__all__ = ["Imatrix", "read_imatrix", "write_imatrix"]


@dataclass
class Imatrix:
    #: tensor name -> (float32 sums of x_j^2 over tokens, token count)
    entries: dict[str, tuple[np.ndarray, int]]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def mean(self, name: str) -> np.ndarray:
        """The importance weights llama.cpp quantizes ``name`` with (ones where nothing was counted)."""
        sums, count = self.entries[name]
        return sums / np.float32(count) if count > 0 else np.ones_like(sums)


def write_imatrix(imat: Imatrix, path: str) -> None:
    """A llama.cpp imatrix GGUF (written atomically)."""
    import gguf

    tmp = f"{path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(imat.datasets) or ["bitsearch"])
    w.add_uint32("imatrix.chunk_count", int(imat.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(imat.chunk_size))
    for name, (sums, count) in imat.entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(count)]], dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)


def _bad(path: str, why: str) -> BitsearchError:
    return BitsearchError(f"imatrix file '{path}' {why}")


def _read_gguf(path: str) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError, struct.error, IndexError ...
        raise _bad(path, f"is a malformed GGUF file ({type(exc).__name__})") from None

    def field_value(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise _bad(path, f"stores {t.name} as {t.tensor_type.name}, not F32")
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32)
    if not pairs:
        raise _bad(path, "is a GGUF file without importance-matrix tensors (*.in_sum2, *.counts)")
    entries = {}
    for name, p in pairs.items():
        if len(p) != 2:
            raise _bad(path, f"has sums without counts (or counts without sums) for '{name}'")
        sums, counts = p[".in_sum2"].reshape(-1), p[".counts"].reshape(-1)
        if counts.size != 1:
            raise _bad(path, f"has {counts.size} experts for '{name}'; bitsearch reads dense models only")
        if not (np.all(np.isfinite(sums)) and np.isfinite(counts[0]) and counts[0] >= 0):
            raise _bad(path, f"has non-finite or negative values for '{name}'")
        entries[name] = (sums, int(round(float(counts[0]))))
    datasets = field_value("imatrix.datasets") or []
    return Imatrix(
        entries,
        [str(d) for d in datasets],
        int(field_value("imatrix.chunk_count") or 0),
        int(field_value("imatrix.chunk_size") or 0),
    )


def _read_legacy(path: str) -> Imatrix:
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _bad(path, "is truncated (or neither a GGUF nor a legacy .dat imatrix)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > len(data):
        raise _bad(path, f"is neither a GGUF nor a legacy .dat imatrix (it claims {n} entries)")
    entries = {}
    for _ in range(n):
        (length,) = take("<i")
        if length < 1 or length > 4096:
            raise _bad(path, "has a malformed entry name (is it an imatrix file?)")
        (raw,) = take(f"<{length}s")
        ncall, nval = take("<ii")
        if nval < 1 or ncall < 0:
            raise _bad(path, f"has a malformed entry for '{raw[:60].decode('utf-8', 'replace')}'")
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, "has an entry name that is not UTF-8 (is it an imatrix file?)") from None
        if not np.all(np.isfinite(vals)):
            raise _bad(path, f"has non-finite values for '{name}'")
        entries[name] = (vals, ncall)  # the legacy sums are mean * ncall: mean() divides by ncall
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                datasets = [data[pos : pos + length].decode("utf-8", "replace")]
    return Imatrix(entries, datasets, chunks, 0)


def read_imatrix(path: str) -> Imatrix:
    """An imatrix from a llama.cpp GGUF or legacy .dat file; one-line errors for malformed files."""
    if not os.path.isfile(path):
        raise BitsearchError(f"imatrix file '{path}' does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
