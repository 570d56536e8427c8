"""The CPU kernels of packed rows (``kernel.c``), compiled on first use with the system C compiler.

The shared library is built once per source, compiler flags and CPU into a cache folder
(``$BITSEARCH_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/bitsearch`` or ``~/.cache/bitsearch``) and
loaded with ``ctypes`` (no Python headers, a compile takes about a second). :func:`get_kernel`
returns ``None`` when no compiler is found, the build fails, or ``BITSEARCH_KERNEL=off``; the
callers then take the pure-torch path, which gives the same outputs. ``BITSEARCH_KERNEL=scalar``
builds the portable C path without SIMD (tests compare it with the vector one).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

__all__ = ["PackedKernel", "LayerSlices", "get_kernel", "kernel_mode"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.c")
_FLAGS = {
    "native": ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"],
    "scalar": ["-O3", "-fPIC", "-shared", "-std=c99", "-DBS_SCALAR"],
}
_LOCK = threading.Lock()
_LOADED: dict[str, "PackedKernel | None"] = {}

_P = ctypes.c_void_p
_I = ctypes.c_int64


def kernel_mode() -> str:
    """``native`` (default), ``scalar`` or ``off``, from ``$BITSEARCH_KERNEL``."""
    mode = os.environ.get("BITSEARCH_KERNEL", "native").lower()
    return mode if mode in ("native", "scalar", "off") else "native"


def _cache_dir() -> str:
    if os.environ.get("BITSEARCH_KERNEL_CACHE"):
        return os.environ["BITSEARCH_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bitsearch")


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` code is only valid on the CPU it was built for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(mode: str) -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([cc] + _FLAGS[mode]).encode() + _cpu_id().encode()).hexdigest()[:16]
    folder = _cache_dir()
    lib = os.path.join(folder, f"bitsearch_kernel_{mode}_{key}.so")
    if os.path.isfile(lib):
        return lib
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS[mode], _SOURCE, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            warnings.warn(
                f"bitsearch: the packed-row kernel did not compile ({cc}); packed layers use the torch "
                f"path (same outputs, slower): {done.stderr.strip()[:2000]}",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own temporary file
        return lib
    except OSError:
        return None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Slice(ctypes.Structure):
    """``bs_slice``: one width slice of a layer (``bits`` 16: ``codes`` points at float16 rows)."""

    _fields_ = [
        ("bits", _I),
        ("rows", _I),
        ("K", _I),
        ("G", _I),
        ("ng", _I),
        ("row_bytes", _I),
        ("codes", _P),
        ("scales", _P),
        ("zeros", _P),
        ("out_index", _P),
    ]


class LayerSlices:
    """The slices of one layer as a C array, with the tensors it points into (kept alive here)."""

    def __init__(self, slices: list[tuple], group: int, in_features: int):
        """``slices``: (bits, codes, scales, zeros, out_index) per width; scales/zeros None for 16."""
        self.tensors = [tuple(t.contiguous() if t is not None else None for t in s[1:]) for s in slices]
        items = []
        for (bits, *_), (codes, scales, zeros, index) in zip(slices, self.tensors):
            ng = scales.shape[1] if scales is not None else 0
            items.append(
                Slice(
                    bits,
                    codes.shape[0],
                    in_features,
                    group,
                    ng,
                    codes.shape[1] if bits != 16 else 0,
                    codes.data_ptr(),
                    scales.data_ptr() if scales is not None else None,
                    zeros.data_ptr() if zeros is not None else None,
                    index.data_ptr(),
                )
            )
        self.array = (Slice * len(items))(*items)
        self.count = len(items)


class PackedKernel:
    """ctypes bindings of ``kernel.c``; every tensor argument must be contiguous and on the CPU."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.bs_dequant.argtypes = [ctypes.c_int, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P]
        lib.bs_dequant.restype = None
        lib.bs_gemv_layer.argtypes = [_P, _I, _P, _I, _P, _I]
        lib.bs_gemv_layer.restype = None
        lib.bs_has_avx2.restype = ctypes.c_int
        self.lib = lib
        self.path = path
        self.vector = bool(lib.bs_has_avx2())

    def gemv_layer(self, layer: LayerSlices, x: torch.Tensor, y: torch.Tensor) -> None:
        """Every slice of a layer in one call: y[:, out_index] = x @ slice^T; x (n, K), y (n, N) float32."""
        self.lib.bs_gemv_layer(
            ctypes.addressof(layer.array), layer.count, x.data_ptr(), x.shape[0], y.data_ptr(), y.shape[1]
        )

    def dequant(
        self,
        bits: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        out_index: torch.Tensor,
        group: int,
        w: torch.Tensor,
    ) -> None:
        """w[out_index] = dequantized rows of one width slice; w (N, K) float32."""
        rows, ng = scales.shape
        self.lib.bs_dequant(
            bits,
            rows,
            w.shape[1],
            group,
            ng,
            codes.data_ptr(),
            codes.shape[1],
            scales.data_ptr(),
            zeros.data_ptr(),
            out_index.data_ptr(),
            w.data_ptr(),
        )


def get_kernel(mode: str | None = None) -> PackedKernel | None:
    """The compiled kernel for ``mode`` (default: :func:`kernel_mode`), or ``None`` (torch path)."""
    mode = mode or kernel_mode()
    if mode == "off":
        return None
    with _LOCK:
        if mode not in _LOADED:
            path = _build(mode)
            _LOADED[mode] = PackedKernel(path) if path else None
        return _LOADED[mode]
