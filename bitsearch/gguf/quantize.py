"""llama.cpp's own quantizers, called through ctypes in the ggml library llama-cpp-python builds.

``quantize(w, type, imatrix)`` runs ``ggml_quantize_chunk`` (what ``llama-quantize`` runs per
tensor, with the importance weights it would pass) and returns the exact bytes a GGUF file stores;
``dequantize(data, type, shape)`` runs the type's ``to_float`` from ``ggml_get_type_traits``
(what llama.cpp's CPU backend dequantizes with). Nothing is re-implemented here: the numbers are
llama.cpp's. The library is found in the installed ``llama_cpp`` package (the ``gguf`` extra);
without it every call raises a one-line :class:`BitsearchError`.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import numpy as np

from ..errors import BitsearchError
from .types import ggml_type, row_bytes

__all__ = ["ggml_library", "quantize", "dequantize", "round_trip"]

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _find_library() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise BitsearchError(
            "llama.cpp's quantizers need the llama-cpp-python package "
            "(pip install 'bitsearch[gguf]', or BITSEARCH_EXTRAS=gguf ./setup.sh)"
        ) from None
    root = os.path.dirname(llama_cpp.__file__)
    for pattern in ("lib/libggml-base.*", "lib/libggml.*", "**/libggml-base.*", "**/libggml.*"):
        hits = [
            p for p in glob.glob(os.path.join(root, pattern), recursive=True) if p.endswith((".so", ".dylib", ".dll"))
        ]
        if hits:
            return sorted(hits)[0]
    raise BitsearchError(f"the llama_cpp package at {root} ships no ggml library")


def ggml_library() -> ctypes.CDLL:
    """The ggml base library (loaded once), with the signatures bitsearch calls."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = ctypes.CDLL(_find_library())
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            lib.ggml_row_size.restype = ctypes.c_size_t
            lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            _LIB = lib
        return _LIB


def _check_imatrix(imatrix, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    im = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32))
    if im.shape != (n_per_row,):
        raise BitsearchError(f"importance weights have shape {im.shape}, the tensor's rows {n_per_row} weights")
    return im


def quantize(w: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``w`` (rows, n_per_row) stored as ``type_name`` by llama.cpp: uint8 (rows, row bytes)."""
    t = ggml_type(type_name)
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
    if w.ndim != 2:
        raise BitsearchError(f"ggml quantizes 2-D tensors (got shape {w.shape})")
    rows, n = w.shape
    rb = row_bytes(t.name, n)
    im = _check_imatrix(imatrix, n)
    lib = ggml_library()
    if im is None and lib.ggml_quantize_requires_imatrix(t.id):
        raise BitsearchError(f"llama.cpp quantizes {t.name} only with an importance matrix")
    if t.name == "F32":
        return w.view(np.uint8).reshape(rows, rb).copy()
    out = np.empty((rows, rb), dtype=np.uint8)
    done = lib.ggml_quantize_chunk(
        t.id, w.ctypes.data, out.ctypes.data, 0, rows, n, im.ctypes.data if im is not None else None
    )
    if done != rows * rb:
        raise BitsearchError(f"ggml wrote {done} bytes for a {rows}x{n} {t.name} tensor, expected {rows * rb}")
    return out


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, n_per_row) from the bytes of a ``type_name`` tensor, by ggml's ``to_float``."""
    t = ggml_type(type_name)
    rows, n = shape
    data = np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).reshape(-1)
    if data.size != rows * row_bytes(t.name, n):
        raise BitsearchError(f"{data.size} bytes do not hold a {rows}x{n} {t.name} tensor")
    if t.name == "F32":
        return data.view(np.float32).reshape(rows, n).copy()
    traits = ggml_library().ggml_get_type_traits(t.id).contents
    if not traits.to_float:
        raise BitsearchError(f"ggml has no dequantizer for {t.name}")
    out = np.empty((rows, n), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, rows * n)
    return out


def round_trip(w: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``dequantize(quantize(w))``: the weights llama.cpp computes with for ``w`` stored as the type."""
    w = np.asarray(w, dtype=np.float32)
    return dequantize(quantize(w, type_name, imatrix), type_name, w.shape)
