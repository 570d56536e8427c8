"""Finalizers by name: the interchangeable ways to turn a bit plan into a quantized model.

A finalizer is a callable ``run(model, plan, batch, settings, *, start=None, show_progress=True,
info=None)`` on a model holding its float weights, the plan, the calibration token ids ``batch``
(N, T) and its settings object (an instance of the entry's ``settings`` dataclass). Either it
*rounds* (``rounds=True``): it writes each target's dequantized weight into the model in place
and returns {layer: (scales float16, zeros uint8)} for ``apply.pack_model``; or it *trains* and
returns the model with its targets already packed. ``start`` (a :class:`Start`, from a rounding
finalizer run first, see :func:`finalize_model`) is where a finalizer that accepts one begins
(``accepts_start``); ``info`` is a dict it may fill with what it measured.

Registered: ``gptq`` (:mod:`.gptq`), ``signround`` (:mod:`.signround`; from a start: that
start's codes), ``qat`` (:mod:`.train`; from a start: its weights and step sizes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..apply import pack_model
from ..errors import BitsearchError
from ..plan import BitPlan
from .gptq import GPTQSettings, gptq_quantize
from .quantizer import convert
from .signround import SignRoundSettings, signround
from .train import QatSettings, finalize_qat

__all__ = ["Start", "FinalizerEntry", "FINALIZERS", "register_finalizer", "get_finalizer", "finalize_model"]


@dataclass
class Start:
    """What a rounding finalizer left: per layer its dequantized weight and (scales, zeros)."""

    weights: dict[str, torch.Tensor]
    qparams: dict


@dataclass(frozen=True)
class FinalizerEntry:
    name: str
    run: Callable[..., Any]
    settings: type
    rounds: bool               # returns qparams (weights dequantized in place), else the packed model
    accepts_start: bool        # can begin from another rounding finalizer's result (init)


FINALIZERS: dict[str, FinalizerEntry] = {}


def register_finalizer(name: str, settings: type, *, rounds: bool, accepts_start: bool):
    """Decorator: register ``run`` under ``name`` with its settings dataclass."""
    def deco(run):
        if name in FINALIZERS:
            raise ValueError(f"finalizer '{name}' is registered twice")
        FINALIZERS[name] = FinalizerEntry(name, run, settings, rounds, accepts_start)
        return run
    return deco


def get_finalizer(name: str) -> FinalizerEntry:
    if name not in FINALIZERS:
        raise BitsearchError(f"unknown finalizer '{name}' (choose from {', '.join(sorted(FINALIZERS))})")
    return FINALIZERS[name]


def _float_weights(model: nn.Module, plan: BitPlan) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in plan.bits}


def finalize_model(model: nn.Module, plan: BitPlan, batch: torch.Tensor, method: str, settings=None, *,
                   init: str = "rtn", init_settings=None, show_progress: bool = True,
                   info: dict | None = None) -> nn.Module:
    """Finalize ``model`` (float weights) under ``plan`` with the finalizer ``method``, in place,
    starting from the rounding finalizer ``init`` ("rtn": round-to-nearest, no start); returns
    the model with its targets packed (exactly ``plan.n_bytes()`` bytes). ``settings`` /
    ``init_settings``: the finalizers' settings objects (None: their defaults). ``info`` gets
    per finalizer what it reported and its seconds."""
    entry = get_finalizer(method)
    info = {} if info is None else info
    start = None
    if init != "rtn":
        first = get_finalizer(init)
        if not first.rounds:
            raise BitsearchError(f"--init {init}: only a rounding finalizer can start another "
                                 f"({', '.join(n for n, e in sorted(FINALIZERS.items()) if e.rounds)})")
        if not entry.accepts_start:
            raise BitsearchError(f"finalizer '{method}' cannot start from '{init}' (use --init rtn)")
        floats = _float_weights(model, plan)
        t0 = time.time()
        sub: dict = {}
        qparams = first.run(model, plan, batch, init_settings or first.settings(), show_progress=show_progress,
                            info=sub)
        info[init] = dict(sub, seconds=round(time.time() - t0, 1))
        start = Start(_float_weights(model, plan), qparams)
        with torch.no_grad():                 # the next finalizer gets the float model back
            for n, w in floats.items():
                model.get_submodule(n).weight.copy_(w)
    t0 = time.time()
    sub = {}
    out = entry.run(model, plan, batch, settings or entry.settings(), start=start, show_progress=show_progress,
                    info=sub)
    info[method] = dict(sub, seconds=round(time.time() - t0, 1))
    if entry.rounds:
        pack_model(model, plan, out)
        return model
    return out


# ------------------------------------------------------------------------------ the finalizers

def _gptq(model, plan, batch, settings, *, start=None, show_progress=True, info=None):
    res = gptq_quantize(model, plan, batch, settings, show_progress=show_progress)
    if info is not None:
        info["rtn_layers"] = sum(1 for i in res.info.values() if i["rtn"])
    return res


def _signround(model, plan, batch, settings, *, start=None, show_progress=True, info=None):
    res = signround(model, plan, batch, settings, show_progress=show_progress,
                    start=start.weights if start is not None else None)
    if info is not None:
        info["kept_start_blocks"] = sum(1 for b in res.block_losses if b["targets"] and b["best_step"] == -1)
    return res


def _qat(model, plan, batch, settings, *, start=None, show_progress=True, info=None):
    floats = None
    if start is not None:     # train from the start's weights and step sizes, still matching the float model
        floats = _float_weights(model, plan)
        with torch.no_grad():
            for n, w in start.weights.items():
                model.get_submodule(n).weight.copy_(w)
    stats = finalize_qat(model, plan, batch, settings, show_progress=show_progress,
                         init_qparams=start.qparams if start is not None else None, float_weights=floats)
    if info is not None:
        info.update(stats)
    return convert(model, plan)


def _register_builtin() -> None:
    register_finalizer("gptq", GPTQSettings, rounds=True, accepts_start=False)(_gptq)
    register_finalizer("signround", SignRoundSettings, rounds=True, accepts_start=True)(_signround)
    register_finalizer("qat", QatSettings, rounds=False, accepts_start=True)(_qat)


_register_builtin()
