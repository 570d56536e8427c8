"""llama.cpp itself, through llama-cpp-python's bindings: run a GGUF file, quantize one as ``llama-quantize`` does.

:class:`LlamaCpp` loads a GGUF with extra (repacking) buffer types off (llama.cpp's AMX repacking
crashes on some CPUs) and returns next-token logits or the perplexity of 512-token windows, each
window evaluated from an empty cache. :func:`llama_quantize` calls ``llama_model_quantize`` with
per-tensor type overrides (the entries of a ``--tensor-type-file``) and importance weights read
from a llama.cpp imatrix file, so bitsearch's files can be checked against llama.cpp's own tool.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from ..errors import BitsearchError
from .imatrix import Imatrix
from .types import ggml_type

__all__ = ["LlamaCpp", "llama_quantize", "LLAMA_FTYPES"]

#: llama_ftype values of the presets (include/llama.h)
LLAMA_FTYPES = {
    "Q4_0": 2,
    "Q8_0": 7,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "Q2_K_S": 21,
    "IQ3_XS": 22,
    "IQ3_XXS": 23,
    "IQ4_NL": 25,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ4_XS": 30,
}


def _lib():
    try:
        import llama_cpp
    except ImportError:
        raise BitsearchError("running llama.cpp needs llama-cpp-python (pip install 'bitsearch[gguf]')") from None
    return llama_cpp


_SILENT = None  # llama.cpp keeps the log callback: it must outlive every call


def _quiet(L) -> None:
    global _SILENT
    if _SILENT is None:
        _SILENT = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(_SILENT, ctypes.c_void_p(0))


class LlamaCpp:
    """A GGUF model in llama.cpp (CPU), evaluated window by window."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int = 1):
        L = self.L = _lib()
        _quiet(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise BitsearchError(f"llama.cpp cannot load '{path}'")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise BitsearchError(f"llama.cpp cannot make a context for '{path}'")
        self.n_ctx = n_ctx
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, ids) -> np.ndarray:
        """(len(ids), vocab) float32 next-token logits of one window, from an empty cache."""
        ids = [int(i) for i in ids]
        n = len(ids)
        if not 0 < n <= self.n_ctx:
            raise BitsearchError(f"a window of {n} tokens does not fit the context of {self.n_ctx}")
        L, b = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        b.n_tokens = n
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, True
            b.seq_id[i][0] = 0
        if L.llama_decode(self.ctx, b) != 0:
            raise BitsearchError("llama.cpp failed to evaluate a window")
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def perplexity(self, ids, seq_len: int = 512) -> tuple[float, int]:
        """(perplexity, predicted tokens) over consecutive windows of ``seq_len`` tokens (the last
        partial window dropped), every token but each window's first predicted."""
        ids = np.asarray(ids)
        nll, count = 0.0, 0
        for s in range(0, len(ids) - seq_len + 1, seq_len):
            w = ids[s : s + seq_len]
            lg = self.logits(w).astype(np.float64)[:-1]
            m = lg.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(lg - m).sum(1))
            nll += float((lse - lg[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
        if count == 0:
            raise BitsearchError(f"fewer than {seq_len} tokens to evaluate")
        return math.exp(nll / count), count


def llama_quantize(
    src: str,
    dst: str,
    ftype: str = "Q8_0",
    *,
    overrides: list[tuple[str, str]] | None = None,
    imatrix: Imatrix | None = None,
    threads: int = 1,
) -> None:
    """llama.cpp's ``llama_model_quantize`` of an F32/F16 GGUF: preset ``ftype``, per-tensor
    ``overrides`` [(regex, type)] as ``--tensor-type`` gives them, importance weights ``imatrix``."""
    L = _lib()
    _quiet(L)
    if ftype not in LLAMA_FTYPES:
        raise BitsearchError(f"unknown llama.cpp preset '{ftype}' (choose from {', '.join(LLAMA_FTYPES)})")
    p = L.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = LLAMA_FTYPES[ftype]
    keep = []
    if overrides:
        arr = (L.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            raw = pattern.lower().encode()
            keep.append(raw)
            arr[i].pattern, arr[i].type = raw, ggml_type(t).id
        arr[len(overrides)].pattern = None
        p.tt_overrides = arr
        keep.append(arr)
    if imatrix is not None:
        names = list(imatrix.entries)
        arr = (L.llama_model_imatrix_data * (len(names) + 1))()
        for i, name in enumerate(names):
            values = np.ascontiguousarray(imatrix.mean(name), dtype=np.float32)
            raw = name.encode()
            keep += [values, raw]
            arr[i].name, arr[i].size = raw, values.size
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[len(names)].name = None
        p.imatrix = arr
        keep.append(arr)
    if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise BitsearchError(f"llama.cpp failed to quantize '{src}' to {ftype}")
