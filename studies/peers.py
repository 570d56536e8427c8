"""Adapters for two peer weight-only quantizers, run through their own packages: HQQ (``hqq``)
and AutoRound (``auto_round``). Used by ``studies/benchmark.py``.

* HQQ: Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"
  (mobiusml blog / ``hqq`` package). Data-free: per group of ``group_size`` consecutive input
  columns of one output row, an asymmetric b-bit grid whose zero point is fitted by a
  half-quadratic (proximal, lp-norm with p < 1) solver; the scale is the min-max one.
* AutoRound / SignRound: Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent
  for the Quantization of LLMs", arXiv 2309.05516 (Intel ``auto-round`` package). Block by
  block, the rounding offsets and the min/max clipping of every group are tuned with signed
  gradient descent on the block's output MSE over calibration tokens.

Both adapters change the model **in place**: every target ``nn.Linear`` (all the linears inside
the decoder blocks, :func:`bitsearch.models.find_targets`; not the embeddings nor ``lm_head``)
keeps its module and gets its dequantized ("fake-quantized") float weight, so the model then
runs, and is evaluated, as an ordinary float model. Each returns a dict with

``stored_bytes``  bytes the method's own storage needs for the target layers;
``avg_bits``      8 * stored_bytes / number of target weights;
``seconds``       wall time of the quantization itself (not loading, not our checks);
``config``        e.g. ``"HQQ W2 g64"``;

plus ``method``, ``bits``, ``group_size``, ``n_weights`` and method-specific notes.

How bytes are counted (groups of G consecutive input columns of one row; a row whose length is
not a multiple of G has a last, shorter group, so a row has ceil(in / G) groups; every row's
codes take ceil(in * b / 8) bytes, the same count as the benchmark's uniform baselines; the
total is rounded up to whole bytes once):

* HQQ, as ``HQQLinear`` stores it by default: b-bit codes + one float16 scale + one float16 zero
  per group (HQQ's zero is a float fitted by the solver; at 4 bits HQQ's default config rounds
  it to an integer, but it is still stored as float16): b + 32 / G bits per weight (W2 g64:
  2.5, W3 g128: 3.25, W4 g128: 4.25). HQQ's own bit packing is not exactly b bits per code at
  3 bits: it puts 10 codes into one int32 (3.2 bits per code, plus padding to a multiple of 10
  groups); ``packed_bytes`` gives the bytes of HQQ's actual packed tensors (codes from
  ``Quantizer.pack`` + float16 scale and zero), or None where HQQ's packer cannot pack the
  layer's group count (its 2- and 4-bit packers need a group count divisible by 4 / 2).
* AutoRound, as its default export (GPTQ-style ``auto_round`` packing: qweight, float16
  scales, b-bit qzeros) stores it: b-bit codes + one float16 scale + one b-bit integer zero per
  group: b + (16 + b) / G bits per weight (W2 g128: 2.1406, W3 g128: 3.1484, W4 g128: 4.1563).

The weights written back are exactly what those stores decode to: HQQ's codes with its scale
and zero rounded to float16 (as ``HQQLinear`` keeps them, in its float16 compute dtype), and
AutoRound's own quantize-dequantize of each layer (float16 scale, integer zero), which the
adapter checks against the scale and zero AutoRound leaves on the module.

:func:`available` tells which of the two packages can be imported.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

from bitsearch.models import find_targets

__all__ = ["available", "hqq_quantize", "autoround_quantize", "storage_bits"]

_PACKAGES = {"hqq": ("hqq.core.quantize", "hqq"), "autoround": ("auto_round", "auto-round")}


def available() -> dict[str, str | None]:
    """For "hqq" and "autoround": None when the package imports, else a one-line reason."""
    out: dict[str, str | None] = {}
    for name, (module, pip_name) in _PACKAGES.items():
        try:
            importlib.import_module(module)
            out[name] = None
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.split(".")[0] == exc.name.split(".")[0]:
                out[name] = f"not installed: pip install {pip_name}"
            else:
                out[name] = f"cannot import {module}: missing dependency {exc.name}"
        except Exception as exc:  # a broken install: report it, let the benchmark skip the peer
            first = (str(exc).strip().splitlines() or [""])[0]
            out[name] = f"cannot import {module}: {type(exc).__name__}: {first}"[:200]
    return out


def _linear_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    out = []
    for t in find_targets(model):
        mod = model.get_submodule(t.name)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"target '{t.name}' is a {type(mod).__name__}, not an nn.Linear")
        out.append((t.name, mod))
    return out


def storage_bits(shapes: list[tuple[int, int]], bits: int, group_size: int, meta_bits_per_group: float) -> int:
    """Bits of b-bit codes (every row padded to whole bytes) + ``meta_bits_per_group`` per group
    of ``group_size`` columns (ceil(in / G) groups per row), summed over (out, in) shapes."""
    total = 0
    for out_f, in_f in shapes:
        total += out_f * (8 * math.ceil(in_f * bits / 8) + math.ceil(in_f / group_size) * meta_bits_per_group)
    return math.ceil(total)


def _summary(method: str, bits: int, group_size: int, shapes, meta_bits: float, seconds: float, **extra) -> dict:
    n_weights = sum(o * i for o, i in shapes)
    stored = math.ceil(storage_bits(shapes, bits, group_size, meta_bits) / 8)
    return {"method": method, "config": f"{method} W{bits} g{group_size}", "bits": bits,
            "group_size": group_size, "stored_bytes": int(stored), "n_weights": int(n_weights),
            "avg_bits": 8 * stored / n_weights, "seconds": float(seconds), **extra}


# ----------------------------------------------------------------------------------- HQQ


def _hqq_part(W: torch.Tensor, bits: int, group_size: int, axis: int, round_zero: bool, device: str):
    """HQQ-quantize ``W`` [rows, cols] (cols a multiple of ``group_size``) in groups of
    ``group_size`` consecutive columns of a row; (dequantized float32 W, codes [groups, G], meta)."""
    from hqq.core.quantize import Quantizer

    # axis=1 reshapes W row-major to [rows * cols / G, G]: one row of that = one group
    codes, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=group_size,
                                     optimize=True, round_zero=round_zero, axis=axis,
                                     bitpack=False, device=device)
    # HQQLinear keeps scale and zero in its float16 compute dtype: decode from those values
    meta = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float(),
                compute_dtype=torch.float32)
    deq = Quantizer.dequantize(codes, meta)
    return deq, codes, meta


def _hqq_packed_bytes(codes: torch.Tensor, n_meta: int, bits: int) -> int | None:
    from hqq.core.quantize import Quantizer

    packing = Quantizer.bit_to_packing[bits]
    try:
        packed = Quantizer.pack[packing](codes)
    except Exception:   # HQQ's 1/2/4-bit packers need a group count divisible by 8/4/2
        return None
    per_word = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8, "3bit_32": 10}[packing]
    if packed.shape[0] * per_word < codes.shape[0]:
        return None
    return packed.numel() * packed.element_size() + 4 * n_meta


@torch.no_grad()
def hqq_quantize(model: nn.Module, bits: int, group_size: int, *, axis: int = 1, device: str = "cpu",
                 round_zero: bool | None = None) -> dict:
    """Quantize the decoder-block linears of ``model`` in place with HQQ (hqq's ``Quantizer``,
    ``optimize=True``: the default half-quadratic zero-point solver), data-free.

    ``axis=1`` (HQQ's default for ``BaseQuantizeConfig``): groups of ``group_size`` consecutive
    input columns of one output row, the grouping counted in ``stored_bytes``; a row whose
    length is not a multiple of ``group_size`` ends with one shorter group (quantized by a
    second HQQ call). ``axis=0`` is passed to HQQ as is: its groups are then the columns of the
    weight reshaped to [group_size, -1] (strided, not consecutive), still numel / group_size
    groups, so the same bytes when ``in_features`` is a multiple of ``group_size``.
    ``round_zero``: None follows HQQ's ``BaseQuantizeConfig`` default (zero rounded at 4 bits
    only). ``device``: where HQQ's solver runs (float32).
    """
    from hqq.core.quantize import Quantizer

    if bits not in Quantizer.SUPPORTED_BITS or bits != int(bits):
        raise ValueError(f"HQQ supports integer widths {sorted(b for b in Quantizer.SUPPORTED_BITS if b == int(b))}, "
                         f"not {bits}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, not {axis}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, not {group_size}")
    rz = (bits == 4) if round_zero is None else bool(round_zero)
    targets = _linear_targets(model)
    shapes, packed = [], 0
    t0 = time.perf_counter()
    for name, mod in targets:
        W = mod.weight.detach().to(device=device, dtype=torch.float32)
        rows, cols = W.shape
        if axis == 0:
            if W.numel() % group_size:
                raise ValueError(f"'{name}': HQQ's axis=0 needs {W.numel()} weights divisible by {group_size}")
            spans = [(0, cols, group_size)]
        else:
            # the full groups in one HQQ call, the last shorter group of every row in a second
            full = cols - cols % group_size
            spans = ([(0, full, group_size)] if full else []) + ([(full, cols, cols - full)] if cols > full else [])
        parts, layer_packed = [], 0
        for lo, hi, g in spans:
            deq, codes, meta = _hqq_part(W[:, lo:hi].contiguous(), bits, g, axis, rz, device)
            parts.append(deq)
            pb = _hqq_packed_bytes(codes, meta["scale"].numel(), bits)
            layer_packed = None if (pb is None or layer_packed is None) else layer_packed + pb
        deq = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        mod.weight.data.copy_(deq.to(device=mod.weight.device, dtype=mod.weight.dtype))
        shapes.append((rows, cols))
        packed = None if (packed is None or layer_packed is None) else packed + layer_packed
    seconds = time.perf_counter() - t0
    return _summary("HQQ", bits, group_size, shapes, 32, seconds, packed_bytes=packed, axis=axis,
                    round_zero=rz)


# ----------------------------------------------------------------------------- AutoRound


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence AutoRound's logger, its tqdm bars and warnings; replay the captured stderr if the
    block raises."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("autoround")
    level = logger.level
    buf = io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise
    finally:
        logger.setLevel(level)


def _module_state(model: nn.Module):
    return ({id(m): set(vars(m)) for m in model.modules()},
            {id(p): p.requires_grad for p in model.parameters()}, model.training)


def _restore_modules(model: nn.Module, state) -> None:
    """Drop the attributes AutoRound left on the modules (per-layer scale / zp / bits, block
    ``forward`` / ``orig_forward`` overrides, ``global_name`` ...), so every module is a plain
    torch / transformers module again; restore requires_grad and the train/eval mode."""
    keys, grads, training = state
    for m in model.modules():
        for k in set(vars(m)) - keys.get(id(m), set(vars(m))):
            delattr(m, k)
        if m._forward_hooks or m._forward_pre_hooks:
            raise RuntimeError(f"AutoRound left hooks on a {type(m).__name__}")
    for p in model.parameters():
        p.requires_grad_(grads.get(id(p), p.requires_grad))
    model.train(training)


def _check_autoround_layer(name: str, mod: nn.Module, bits: int, group_size: int) -> int:
    """The layer's weight is AutoRound's decode of b-bit codes with its float16 scale and
    integer zero (left on the module as ``scale`` / ``zp``, one per row and group); returns the
    number of groups."""
    scale, zp = getattr(mod, "scale", None), getattr(mod, "zp", None)
    if not isinstance(scale, torch.Tensor) or not isinstance(zp, torch.Tensor):
        raise RuntimeError(f"AutoRound did not quantize '{name}' (no scale / zp on the module)")
    out_f, in_f = mod.weight.shape
    n_groups = math.ceil(in_f / group_size)
    if tuple(scale.shape) != (out_f, n_groups):
        raise RuntimeError(f"'{name}': AutoRound's scale has shape {tuple(scale.shape)}, "
                           f"expected {(out_f, n_groups)} (group size {group_size})")
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :in_f]
    z = zp.float().repeat_interleave(group_size, dim=1)[:, :in_f]
    W = mod.weight.detach().float()
    q = torch.round(W / s + z)
    ok = (torch.equal(zp.float(), zp.float().round()) and zp.min() >= 0 and zp.max() <= 2 ** bits - 1
          and q.min() >= 0 and q.max() <= 2 ** bits - 1
          and torch.allclose((q - z) * s, W, rtol=1e-5, atol=1e-6 * float(s.abs().max())))
    if not ok:
        raise RuntimeError(f"'{name}': the weight is not a b-bit decode of AutoRound's scale / zp")
    return n_groups


def autoround_quantize(model: nn.Module, tokenizer, batch: torch.LongTensor, bits: int, group_size: int, *,
                       iters: int = 200, device: str = "cpu", seed: int = 0, batch_size: int = 8,
                       quiet: bool = True) -> dict:
    """Quantize the decoder-block linears of ``model`` in place with AutoRound (SignRound),
    asymmetric (``sym=False``), ``bits`` / ``group_size`` / ``iters``, calibrated on exactly
    the rows of ``batch`` ([n_samples, seq_len] token ids; nsamples = n_samples, seqlen = seq_len;
    no dataset is downloaded). AutoRound's other settings are its defaults (lr = 1 / iters,
    min-max tuning, best-MSE rounding kept, quantized inputs to later blocks, mini-batches of
    ``batch_size`` = 8 samples); torch.compile is off. lm_head and the embeddings stay float.

    AutoRound is run without export (``AutoRound(...).quantize()``): it leaves each quantized
    ``nn.Linear`` holding its quantize-dequantized weight, with the float16 ``scale`` and
    integer ``zp`` as extra attributes. The adapter checks every target against those, then
    removes everything AutoRound attached to the modules. ``tokenizer``: AutoRound refuses a
    model object without one (only used for its pad-token id). ``quiet``: silence AutoRound's
    log and progress bars (replayed on an error).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    if batch.dim() != 2:
        raise ValueError(f"batch must be [n_samples, seq_len] token ids, got shape {tuple(batch.shape)}")
    n_samples, seq_len = (int(s) for s in batch.shape)
    targets = _linear_targets(model)
    target_ids = {id(mod) for _, mod in targets}
    # only the decoder-block linears: everything else AutoRound might pick up stays float
    others = {n: {"bits": 16} for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and id(m) not in target_ids}
    dev = torch.device(device)
    if next(model.parameters()).device != dev:
        model.to(dev)
    state = _module_state(model)
    # AutoRound consumes a list of ready tensors as they are (one forward per element)
    data = [chunk.to(dev) for chunk in batch.split(batch_size)]
    config = SignRoundConfig(iters=iters, bits=bits, group_size=group_size, sym=False)
    scheme = f"W{bits}A16"
    t0 = time.perf_counter()
    with _quiet(quiet):
        ar = AutoRound(model, tokenizer=tokenizer, scheme=scheme, alg_configs=config, dataset=data,
                       nsamples=n_samples, seqlen=seq_len, batch_size=batch_size, seed=seed,
                       device_map=str(dev) if dev.type != "cuda" else (dev.index or 0),
                       enable_torch_compile=False, low_gpu_mem_usage=False,
                       layer_config=others or None)
        quantized, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    if quantized is not model:
        raise RuntimeError("AutoRound returned a different model object than the one passed in")
    shapes = []
    for name, mod in targets:
        _check_autoround_layer(name, mod, bits, group_size)
        shapes.append(tuple(mod.weight.shape))
    _restore_modules(model, state)
    del ar
    return _summary("AutoRound", bits, group_size, shapes, 16 + bits, seconds, iters=iters,
                    n_samples=n_samples, seq_len=seq_len, seed=seed)
