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

__all__ = ["PackedKernel", "get_kernel", "kernel_mode"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.c")
_FLAGS = {"native": ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"],
          "scalar": ["-O3", "-fPIC", "-shared", "-std=c99", "-DBS_SCALAR"]}
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
            warnings.warn(f"bitsearch: the packed-row kernel did not compile ({cc}); packed layers use the torch "
                          f"path (same outputs, slower): {done.stderr.strip()[:2000]}", RuntimeWarning, stacklevel=3)
            return None
        os.replace(tmp, lib)   # atomic: concurrent builders each write their own temporary file
        return lib
    except OSError:
        return None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class PackedKernel:
    """ctypes bindings of ``kernel.c``; every tensor argument must be contiguous and on the CPU."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.bs_gemv.argtypes = [ctypes.c_int, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _I, _P, _I]
        lib.bs_gemv.restype = None
        lib.bs_gemv_f16.argtypes = [_I, _I, _P, _P, _P, _I, _P, _I]
        lib.bs_gemv_f16.restype = None
        lib.bs_dequant.argtypes = [ctypes.c_int, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P]
        lib.bs_dequant.restype = None
        lib.bs_has_avx2.restype = ctypes.c_int
        self.lib = lib
        self.path = path
        self.vector = bool(lib.bs_has_avx2())

    def gemv(self, bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             out_index: torch.Tensor, group: int, in_features: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[:, out_index] = x @ dequantized(codes)^T for one width slice; x (n, K), y (n, N) float32."""
        rows, ng = scales.shape
        self.lib.bs_gemv(bits, rows, in_features, group, ng, codes.data_ptr(), codes.shape[1], scales.data_ptr(),
                         zeros.data_ptr(), out_index.data_ptr(), x.data_ptr(), x.shape[0], y.data_ptr(), y.shape[1])

    def gemv_f16(self, weight: torch.Tensor, out_index: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[:, out_index] = x @ weight^T for rows kept in float16 (weight (rows, K) float16)."""
        self.lib.bs_gemv_f16(weight.shape[0], weight.shape[1], weight.data_ptr(), out_index.data_ptr(),
                             x.data_ptr(), x.shape[0], y.data_ptr(), y.shape[1])

    def dequant(self, bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                out_index: torch.Tensor, group: int, w: torch.Tensor) -> None:
        """w[out_index] = dequantized rows of one width slice; w (N, K) float32."""
        rows, ng = scales.shape
        self.lib.bs_dequant(bits, rows, w.shape[1], group, ng, codes.data_ptr(), codes.shape[1], scales.data_ptr(),
                            zeros.data_ptr(), out_index.data_ptr(), w.data_ptr())


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
