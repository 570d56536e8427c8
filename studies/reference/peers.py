"""Adapters for peer weight-only quantizers, run through their own packages: HQQ (``hqq``),
AutoRound (``auto_round``) and AutoRound's mixed-precision AutoScheme (``auto_round``). Used by
``studies/benchmark.py``.

* HQQ: Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"
  (mobiusml blog / ``hqq`` package). Data-free: per group of ``group_size`` consecutive input
  columns of one output row, an asymmetric b-bit grid whose zero point is fitted by a
  half-quadratic (proximal, lp-norm with p < 1) solver; the scale is the min-max one.
* AutoRound / SignRound: Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent
  for the Quantization of LLMs", arXiv 2309.05516 (Intel ``auto-round`` package). Block by
  block, the rounding offsets and the min/max clipping of every group are tuned with signed
  gradient descent on the block's output MSE over calibration tokens.
* AutoScheme: AutoRound's own per-layer width search (``auto_round.AutoScheme``, its "delta
  loss" method): for every candidate scheme it scores each layer on calibration
  tokens (a gradient-weighted estimate of the loss change its rounding error causes), then a
  knapsack DP picks one scheme per layer under an average-bits budget; AutoRound then quantizes
  every layer at its chosen width as above.

The adapters change the model **in place**: every target ``nn.Linear`` (all the linears inside
the decoder blocks, :func:`bitsearch.models.find_targets`; not the embeddings nor ``lm_head``)
keeps its module and gets its dequantized ("fake-quantized") float weight, so the model then
runs, and is evaluated, as an ordinary float model. Each returns a dict with

``stored_bytes``  bytes the method's own storage needs for the target layers;
``avg_bits``      8 * stored_bytes / number of target weights;
``seconds``       wall time of the quantization itself (not loading, not our checks);
``config``        e.g. ``"HQQ W2 g64"``, ``"AutoScheme W2:30 W3:20 W4:6 g128"``;

plus ``method``, ``group_size``, ``n_weights``, ``bits`` (the width; for AutoScheme ``widths``,
one per target) and method-specific notes.

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
  AutoScheme: the same, every layer at its own width b.

The weights written back are exactly what those stores decode to: HQQ's codes with its scale
and zero rounded to float16 (as ``HQQLinear`` keeps them, in its float16 compute dtype), and
AutoRound's own quantize-dequantize of each layer (float16 scale, integer zero), which the
adapter checks against the scale and zero AutoRound leaves on the module.

:func:`available` tells which of the two packages can be imported (AutoScheme needs only
``auto_round``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch
from torch import nn

from bitsearch.cost import budget_to_bytes
from bitsearch.models import find_targets

__all__ = ["available", "hqq_quantize", "autoround_quantize", "autoscheme_quantize", "storage_bits", "BudgetTooSmall"]

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


def _result(method: str, config: str, shapes, stored_bits: int, seconds: float, **extra) -> dict:
    n_weights = sum(o * i for o, i in shapes)
    stored = math.ceil(stored_bits / 8)
    return {
        "method": method,
        "config": config,
        "stored_bytes": int(stored),
        "n_weights": int(n_weights),
        "avg_bits": 8 * stored / n_weights,
        "seconds": float(seconds),
        **extra,
    }


def _summary(method: str, bits: int, group_size: int, shapes, meta_bits: float, seconds: float, **extra) -> dict:
    return _result(
        method,
        f"{method} W{bits} g{group_size}",
        shapes,
        storage_bits(shapes, bits, group_size, meta_bits),
        seconds,
        bits=bits,
        group_size=group_size,
        **extra,
    )


# ----------------------------------------------------------------------------------- HQQ


def _hqq_part(W: torch.Tensor, bits: int, group_size: int, axis: int, round_zero: bool, device: str):
    """HQQ-quantize ``W`` [rows, cols] (cols a multiple of ``group_size``) in groups of
    ``group_size`` consecutive columns of a row; (dequantized float32 W, codes [groups, G], meta)."""
    from hqq.core.quantize import Quantizer

    # axis=1 reshapes W row-major to [rows * cols / G, G]: one row of that = one group
    codes, meta = Quantizer.quantize(
        W,
        nbits=bits,
        channel_wise=True,
        group_size=group_size,
        optimize=True,
        round_zero=round_zero,
        axis=axis,
        bitpack=False,
        device=device,
    )
    # HQQLinear keeps scale and zero in its float16 compute dtype: decode from those values
    meta = dict(meta, scale=meta["scale"].half().float(), zero=meta["zero"].half().float(), compute_dtype=torch.float32)
    deq = Quantizer.dequantize(codes, meta)
    return deq, codes, meta


def _hqq_packed_bytes(codes: torch.Tensor, n_meta: int, bits: int) -> int | None:
    from hqq.core.quantize import Quantizer

    packing = Quantizer.bit_to_packing[bits]
    try:
        packed = Quantizer.pack[packing](codes)
    except Exception:  # HQQ's 1/2/4-bit packers need a group count divisible by 8/4/2
        return None
    per_word = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8, "3bit_32": 10}[packing]
    if packed.shape[0] * per_word < codes.shape[0]:
        return None
    return packed.numel() * packed.element_size() + 4 * n_meta


@torch.no_grad()
def hqq_quantize(
    model: nn.Module, bits: int, group_size: int, *, axis: int = 1, device: str = "cpu", round_zero: bool | None = None
) -> dict:
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
        raise ValueError(
            f"HQQ supports integer widths {sorted(b for b in Quantizer.SUPPORTED_BITS if b == int(b))}, not {bits}"
        )
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
    return _summary("HQQ", bits, group_size, shapes, 32, seconds, packed_bytes=packed, axis=axis, round_zero=rz)


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
    return (
        {id(m): set(vars(m)) for m in model.modules()},
        {id(p): p.requires_grad for p in model.parameters()},
        model.training,
        {id(m): m.gradient_checkpointing for m in model.modules() if "gradient_checkpointing" in vars(m)},
    )


def _restore_modules(model: nn.Module, state) -> None:
    """Drop the attributes AutoRound left on the modules (per-layer scale / zp / bits, block
    ``forward`` / ``orig_forward`` overrides, ``global_name`` ...), removing first the hooks
    whose handles they hold (AutoScheme turns on the model's gradient checkpointing, which
    hooks the input embeddings), so every module is a plain torch / transformers module again;
    restore the gradient-checkpointing flags, requires_grad and the train/eval mode."""
    keys, grads, training, checkpointing = state
    for m in model.modules():
        for k in set(vars(m)) - keys.get(id(m), set(vars(m))):
            value = getattr(m, k)
            for handle in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(handle, torch.utils.hooks.RemovableHandle):
                    handle.remove()
            delattr(m, k)
        if id(m) in checkpointing:
            m.gradient_checkpointing = checkpointing[id(m)]
    for m in model.modules():  # a handle may sit on another module than its hook
        if m._forward_hooks or m._forward_pre_hooks:
            raise RuntimeError(f"AutoRound left hooks on a {type(m).__name__}")
    for p in model.parameters():
        p.requires_grad_(grads.get(id(p), p.requires_grad))
    model.train(training)


def _check_autoround_layer(name: str, mod: nn.Module, bits: int, group_size: int) -> int:
    """The layer's weight is AutoRound's decode of b-bit codes with its float16 scale and
    integer zero (left on the module as ``scale`` / ``zp``, one per row and group; a symmetric
    layer has one integer ``zp`` for all); returns the number of groups."""
    scale, zp = getattr(mod, "scale", None), getattr(mod, "zp", None)
    if isinstance(zp, int) and not isinstance(zp, bool) and isinstance(scale, torch.Tensor):
        zp = torch.full(scale.shape, float(zp))
    if not isinstance(scale, torch.Tensor) or not isinstance(zp, torch.Tensor):
        raise RuntimeError(f"AutoRound did not quantize '{name}' (no scale / zp on the module)")
    out_f, in_f = mod.weight.shape
    n_groups = math.ceil(in_f / group_size)
    if tuple(scale.shape) != (out_f, n_groups):
        raise RuntimeError(
            f"'{name}': AutoRound's scale has shape {tuple(scale.shape)}, "
            f"expected {(out_f, n_groups)} (group size {group_size})"
        )
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :in_f]
    z = zp.float().repeat_interleave(group_size, dim=1)[:, :in_f]
    W = mod.weight.detach().float()
    q = torch.round(W / s + z)
    ok = (
        torch.equal(zp.float(), zp.float().round())
        and zp.min() >= 0
        and zp.max() <= 2**bits - 1
        and q.min() >= 0
        and q.max() <= 2**bits - 1
        and torch.allclose((q - z) * s, W, rtol=1e-5, atol=1e-6 * float(s.abs().max()))
    )
    if not ok:
        raise RuntimeError(f"'{name}': the weight is not a b-bit decode of AutoRound's scale / zp")
    return n_groups


def _autoround_in_place(
    model: nn.Module,
    tokenizer,
    batch: torch.LongTensor,
    scheme,
    config,
    group_size: int,
    *,
    device: str,
    seed: int,
    batch_size: int,
    quiet: bool,
    layer_config: dict | None = None,
    setup=None,
) -> tuple[list[tuple[int, int]], list[int], float]:
    """Run ``AutoRound(model, scheme=scheme, alg_configs=config).quantize()`` on ``model`` in
    place, calibrated on exactly the rows of ``batch`` ([n_samples, seq_len] token ids, handed to
    AutoRound as a list of ready [batch_size, seq_len] tensors, which it consumes as they are: no
    dataset is downloaded); check that every target holds a decode of the scale / zp AutoRound
    left on it, at the width AutoRound gave it (its ``bits``), and that no other linear was
    quantized; then remove everything AutoRound attached to the modules. ``setup(ar, data)`` runs
    between AutoRound's construction and ``quantize()``. Returns (shapes, widths, seconds): each
    target's (out, in) and width, and the wall time of AutoRound itself."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from auto_round import AutoRound

    if batch.dim() != 2:
        raise ValueError(f"batch must be [n_samples, seq_len] token ids, got shape {tuple(batch.shape)}")
    n_samples, seq_len = (int(s) for s in batch.shape)
    targets = _linear_targets(model)
    target_ids = {id(mod) for _, mod in targets}
    dev = torch.device(device)
    if next(model.parameters()).device != dev:
        model.to(dev)
    state = _module_state(model)
    data = [chunk.to(dev) for chunk in batch.split(batch_size)]
    t0 = time.perf_counter()
    with _quiet(quiet), torch.enable_grad():
        ar = AutoRound(
            model,
            tokenizer=tokenizer,
            scheme=scheme,
            alg_configs=config,
            dataset=data,
            nsamples=n_samples,
            seqlen=seq_len,
            batch_size=batch_size,
            seed=seed,
            device_map=str(dev) if dev.type != "cuda" else (dev.index or 0),
            enable_torch_compile=False,
            low_gpu_mem_usage=False,
            layer_config=layer_config,
            amp=False,
        )
        if setup is not None:
            setup(ar, data)
        quantized, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    if quantized is not model:
        raise RuntimeError("AutoRound returned a different model object than the one passed in")
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.Linear)
            and id(mod) not in target_ids
            and (getattr(mod, "bits", 16) < 16 or isinstance(getattr(mod, "scale", None), torch.Tensor))
        ):
            raise RuntimeError(f"AutoRound quantized '{name}', which is not a target")
    shapes, widths = [], []
    for name, mod in targets:
        bits = int(getattr(mod, "bits", 16))
        _check_autoround_layer(name, mod, bits, group_size)
        shapes.append(tuple(mod.weight.shape))
        widths.append(bits)
    _restore_modules(model, state)
    del ar
    return shapes, widths, seconds


def autoround_quantize(
    model: nn.Module,
    tokenizer,
    batch: torch.LongTensor,
    bits: int,
    group_size: int,
    *,
    iters: int = 200,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    quiet: bool = True,
    sym: bool = False,
) -> dict:
    """Quantize the decoder-block linears of ``model`` in place with AutoRound (SignRound),
    asymmetric (``sym=False``, as every method of the benchmark stores a zero; ``sym=True`` is
    AutoRound's own default, whose packed formats store a zero point all the same, so its bytes
    are counted alike), ``bits`` / ``group_size`` / ``iters``, calibrated on exactly
    the rows of ``batch`` ([n_samples, seq_len] token ids; nsamples = n_samples, seqlen = seq_len;
    no dataset is downloaded). AutoRound's other settings are its defaults (lr = 1 / iters,
    min-max tuning, best-MSE rounding kept, quantized inputs to later blocks, mini-batches of
    ``batch_size`` = 8 samples); torch.compile is off, and so is its mixed precision (``amp``:
    on a CPU with bf16 support AutoRound >= 0.16 would cast the model to bfloat16 and leave it so),
    so it tunes in float32 as bitsearch's finalizers do. lm_head and the embeddings stay float.

    AutoRound is run without export (``AutoRound(...).quantize()``): it leaves each quantized
    ``nn.Linear`` holding its quantize-dequantized weight, with the float16 ``scale`` and
    integer ``zp`` as extra attributes. The adapter checks every target against those, then
    removes everything AutoRound attached to the modules. ``tokenizer``: AutoRound refuses a
    model object without one (only used for its pad-token id). ``quiet``: silence AutoRound's
    log and progress bars (replayed on an error).
    """
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    target_ids = {id(mod) for _, mod in _linear_targets(model)}
    # only the decoder-block linears: everything else AutoRound might pick up stays float
    others = {n: {"bits": 16} for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in target_ids}
    config = SignRoundConfig(iters=iters, bits=bits, group_size=group_size, sym=sym)
    shapes, widths, seconds = _autoround_in_place(
        model,
        tokenizer,
        batch,
        f"W{bits}A16",
        config,
        group_size,
        device=device,
        seed=seed,
        batch_size=batch_size,
        quiet=quiet,
        layer_config=others or None,
    )
    if set(widths) != {bits}:
        raise RuntimeError(f"AutoRound quantized the targets at widths {sorted(set(widths))}, not {bits}")
    return _summary(
        "AutoRound sym" if sym else "AutoRound",
        bits,
        group_size,
        shapes,
        16 + bits,
        seconds,
        iters=iters,
        n_samples=int(batch.shape[0]),
        seq_len=int(batch.shape[1]),
        seed=seed,
        sym=sym,
    )


# ---------------------------------------------------------------------------- AutoScheme


class BudgetTooSmall(ValueError):
    """Even the narrowest option everywhere does not fit the budget (the benchmark skips the point)."""


# the dataset name AutoScheme is given; _autoscheme_calibration serves our tokens under it
_AUTOSCHEME_DATA = "bitsearch-calibration-tokens"


@contextlib.contextmanager
def _autoscheme_calibration(batches: list[torch.Tensor]):
    """Make AutoScheme's scoring run on ``batches`` (our [batch_size, seq_len] token tensors).

    AutoScheme takes its data only by dataset *name*: ``GenScheme`` refuses anything but a
    string, and its scoring (``auto_round.auto_scheme.delta_loss``) builds its loader with
    ``get_dataloader(tokenizer, seqlen, dataset_name, ...)``, which downloads the named dataset
    (and, if that fails, falls back to downloading another). Inside the block that module's
    ``get_dataloader`` serves ``batches`` (as ``{"input_ids": ...}`` mini-batches, labels = the
    inputs, as AutoScheme does) under the name ``_AUTOSCHEME_DATA`` and refuses any other name;
    the block yields a list that gets one entry per loader served. The environment is pinned
    too: AutoScheme's env overrides of nsamples / seqlen / batch size are cleared, its parallel
    scoring (spawned workers that re-load the model and the named dataset themselves) is off,
    and its per-scheme score cache (keyed by the dataset name, not the tokens) lives in a
    throwaway directory.
    """
    from auto_round.auto_scheme import delta_loss

    if not callable(getattr(delta_loss, "get_dataloader", None)):
        raise RuntimeError(
            "this auto-round's AutoScheme has no auto_scheme.delta_loss.get_dataloader "
            "to serve the calibration tokens through"
        )

    served = []

    def serve(tokenizer, seqlen, dataset_name=None, *args, **kwargs):
        if dataset_name != _AUTOSCHEME_DATA:
            raise RuntimeError(
                f"AutoScheme asked for dataset {dataset_name!r}; only the adapter's calibration tokens are served"
            )
        served.append(dataset_name)
        return [{"input_ids": b} for b in batches]

    loader = delta_loss.get_dataloader
    env = {
        "AR_ENABLE_AUTO_SCHEME_PARALLEL": "0",
        "AR_AUTO_SCHEME_NSAMPLES": None,
        "AR_AUTO_SCHEME_SEQLEN": None,
        "AR_AUTO_SCHEME_BATCH_SIZE": None,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AR_AUTO_SCHEME_CACHE"]}
    with tempfile.TemporaryDirectory(prefix="autoscheme-cache-") as cache:
        env["AR_AUTO_SCHEME_CACHE"] = cache
        try:
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            delta_loss.get_dataloader = serve
            yield served
        finally:
            delta_loss.get_dataloader = loader
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _autoscheme_options(options, group_size: int, sym: bool) -> list:
    """AutoRound ``QuantizationScheme`` objects for the preset names in ``options`` (weight-only
    integer schemes, e.g. ``"W3A16"``), each at ``group_size`` and ``sym``, sorted by width."""
    from auto_round.schemes import QuantizationScheme, preset_name_to_scheme

    out = {}
    for name in options:
        preset = preset_name_to_scheme(str(name))
        if (
            preset.data_type != "int"
            or preset.super_bits is not None
            or (preset.act_bits or 16) < 16
            or not 1 <= preset.bits <= 8
        ):
            raise ValueError(
                f"AutoScheme option {name!r}: only weight-only integer schemes (W<b>A16) are counted by this adapter"
            )
        out[preset.bits] = QuantizationScheme(
            bits=preset.bits, group_size=group_size, sym=sym, data_type="int", act_bits=16
        )
    if not out:
        raise ValueError("AutoScheme needs at least one option")
    return [out[b] for b in sorted(out)]


def _autoscheme_target(shapes: list[tuple[int, int]], widths: list[int], group_size: int, budget_bytes: int) -> float:
    """The ``avg_bits`` to give AutoScheme so that whatever it picks fits ``budget_bytes`` by our
    count; BudgetTooSmall (a ValueError) if even every target at the narrowest width does not.

    AutoScheme prices a layer at width b as out * in * b + out * ceil(in / G) * (16 + b) bits
    (``auto_scheme.utils.compute_layer_bits`` with ``ignore_scale_zp_bits=False``: b-bit codes,
    a 16-bit scale and a b-bit zero per group, its zero counted also for a symmetric int scheme),
    and its DP keeps the total at most int(n * avg_bits), n = the number of target weights. Ours
    is the same except that each row's codes are padded to whole bytes; with PAD = the sum over
    the targets of their largest row padding among the widths (0 when every in_features * b is
    a multiple of 8), avg_bits = (8 * budget_bytes - PAD) / n keeps ours within the budget. When
    even the widest width everywhere fits, AutoScheme gets its whole range. AutoScheme refuses a
    target outside [narrowest everywhere, widest everywhere] (by its count) and snaps one within
    1e-3 of an end onto it, so the target is clamped to that range, 2e-3 below its top.
    """
    n = sum(o * i for o, i in shapes)

    def ours(b: int) -> int:
        return math.ceil(storage_bits(shapes, b, group_size, 16 + b) / 8)

    def theirs(b: int) -> float:
        return sum(o * i * b + o * math.ceil(i / group_size) * (16 + b) for o, i in shapes) / n

    lo, hi = min(widths), max(widths)
    if ours(lo) > budget_bytes:
        raise BudgetTooSmall(
            f"AutoScheme: the budget of {8 * budget_bytes / n:.4f} bits per weight ({budget_bytes} "
            f"bytes) is below its cheapest option: every target at W{lo} g{group_size} needs "
            f"{8 * ours(lo) / n:.4f} bits per weight ({ours(lo)} bytes)"
        )
    if ours(hi) <= budget_bytes:
        return theirs(hi)
    pad = sum(max(o * (8 * math.ceil(i * b / 8) - i * b) for b in widths) for o, i in shapes)
    return min(max((8 * budget_bytes - pad) / n, theirs(lo)), theirs(hi) - 2e-3)


def autoscheme_quantize(
    model: nn.Module,
    tokenizer,
    batch: torch.LongTensor,
    avg_bits: float,
    *,
    options=("W2A16", "W3A16", "W4A16"),
    group_size: int = 128,
    sym: bool = False,
    iters: int = 200,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    quiet: bool = True,
) -> dict:
    """Quantize the decoder-block linears of ``model`` in place with AutoRound's AutoScheme: one
    width per layer, chosen by AutoScheme among ``options`` (preset names of weight-only integer
    schemes, each used at ``group_size`` and ``sym``; asymmetric by default, as
    :func:`autoround_quantize`) within a budget of ``avg_bits`` bits per target weight **by our
    byte count** (b + (16 + b) / G per weight of a layer at width b; the budget in bytes rounded
    down), then every layer quantized by AutoRound (SignRound, ``iters``) at its width.

    AutoRound runs with ``scheme=AutoScheme(avg_bits=..., options=...)``; the ``avg_bits`` it
    gets is converted from the budget by :func:`_autoscheme_target` (its own bit count is ours
    up to the byte padding of rows), the bytes of the widths it chose are checked against the
    budget afterwards. AutoScheme scores the layers on exactly the rows of ``batch`` (nsamples =
    n_samples, seqlen = seq_len, mini-batches of ``batch_size``; served by
    :func:`_autoscheme_calibration`, no dataset is downloaded), block by block
    (``low_gpu_mem_usage``, its default), keeping the weights in memory
    (``low_cpu_mem_usage=False``: its default re-reads them from the model's checkpoint). AutoRound
    is then calibrated on the same rows as in :func:`autoround_quantize`, and the targets are
    checked and cleaned the same way. lm_head and the embeddings stay float. BudgetTooSmall if even
    the narrowest option everywhere exceeds the budget.

    Returns the usual dict (``seconds``: AutoScheme's search and AutoRound's quantization;
    ``search_seconds``: the search alone) with ``widths`` {target: width}, ``budget_bytes`` and
    ``autoscheme_avg_bits`` (the target AutoScheme was given).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from auto_round import AutoScheme
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    if batch.dim() != 2:
        raise ValueError(f"batch must be [n_samples, seq_len] token ids, got shape {tuple(batch.shape)}")
    schemes = _autoscheme_options(options, group_size, sym)
    targets = _linear_targets(model)
    shapes = [tuple(mod.weight.shape) for _, mod in targets]
    budget = budget_to_bytes(avg_bits, sum(o * i for o, i in shapes))
    target = _autoscheme_target(shapes, [s.bits for s in schemes], group_size, budget)
    n_samples, seq_len = (int(s) for s in batch.shape)
    scheme = AutoScheme(
        avg_bits=target,
        options=schemes,
        nsamples=n_samples,
        seqlen=seq_len,
        batch_size=batch_size,
        low_cpu_mem_usage=False,
    )
    search_seconds = []

    def name_the_data(ar, data):
        # GenScheme takes the compressor's dataset and accepts only a name: give it ours while
        # AutoScheme runs, and AutoRound's own calibration the token list afterwards
        generate = ar._gen_auto_scheme

        def generate_named():
            ar.dataset = _AUTOSCHEME_DATA
            t0 = time.perf_counter()
            try:
                return generate()
            finally:
                ar.dataset = data
                search_seconds.append(time.perf_counter() - t0)

        ar._gen_auto_scheme = generate_named

    with _autoscheme_calibration([chunk.to(device) for chunk in batch.split(batch_size)]) as served:
        shapes, widths, seconds = _autoround_in_place(
            model,
            tokenizer,
            batch,
            scheme,
            SignRoundConfig(iters=iters),
            group_size,
            device=device,
            seed=seed,
            batch_size=batch_size,
            quiet=quiet,
            setup=name_the_data,
        )
    if len(search_seconds) != 1 or not served:
        raise RuntimeError("AutoRound did not run AutoScheme's search on the calibration tokens")
    if not set(widths) <= {s.bits for s in schemes}:
        raise RuntimeError(f"AutoScheme chose widths {sorted(set(widths))}, not among the options")
    stored_bits = sum(storage_bits([shape], b, group_size, 16 + b) for shape, b in zip(shapes, widths))
    if math.ceil(stored_bits / 8) > budget:
        raise RuntimeError(
            f"AutoScheme's widths need {math.ceil(stored_bits / 8)} bytes, over the budget of {budget} bytes"
        )
    counts = Counter(widths)
    config = "AutoScheme " + " ".join(f"W{b}:{counts[b]}" for b in sorted(counts)) + f" g{group_size}"
    return _result(
        "AutoScheme",
        config,
        shapes,
        stored_bits,
        seconds,
        widths={name: b for (name, _), b in zip(targets, widths)},
        group_size=group_size,
        sym=sym,
        budget_bytes=budget,
        autoscheme_avg_bits=target,
        search_seconds=search_seconds[0],
        iters=iters,
        n_samples=n_samples,
        seq_len=seq_len,
        seed=seed,
    )
