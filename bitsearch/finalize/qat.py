"""The registered ``qat`` finalizer: a :class:`bitsearch.config.FinalizeConfig` resolved by its
recipe (:mod:`.recipes`) into :class:`~.train.QatSettings`, the initial rounding by another
finalizer (``init``: SignRound or GPTQ; kept in the QAT checkpoint, so a resumed run does not
round again), then :func:`~.train.finalize_qat` and the packing of the trained layers."""

from __future__ import annotations

import os
import time

import torch

from ..errors import BitsearchError
from .base import Finalizer, Rounder, get_finalizer, register_finalizer, rounders
from .quantizer import convert
from .recipes import resolve_defaults
from .train import QatSettings, checkpointed_start, finalize_qat

__all__ = ["QatFinalizer", "qat_settings"]


def qat_settings(config, checkpoint: str | None) -> QatSettings:
    """The QAT settings of a :class:`bitsearch.config.FinalizeConfig` (checkpoint file: ``checkpoint``)."""
    keys = (
        "mode",
        "steps",
        "e2e_steps",
        "lr",
        "qparam_lr",
        "batch_size",
        "round_mode",
        "temperature",
        "anneal",
        "clamp_mode",
        "beta",
        "soft_warmup",
        "tile_size",
        "tile_loss",
        "tile_guard",
        "ce_weight",
        "trainable",
        "seed",
        "checkpoint_every",
        "resume",
    )
    config = resolve_defaults(config)
    settings = QatSettings(checkpoint=checkpoint, **{k: getattr(config, k) for k in keys})
    settings.check()
    return settings


def _start_key(config) -> dict:
    """What the initial rounding depends on beyond the plan and the QAT settings."""
    keys = ("init", "signround_steps", "signround_lr", "gptq_damp", "gptq_act_order")
    return {k: getattr(config, k, None) for k in keys}


@register_finalizer
class QatFinalizer(Finalizer):
    """Quantization-aware training (tiled, e2e or both), started from round-to-nearest or from a
    rounder's result (``config.init``)."""

    name = "qat"

    def check(self, config, checkpoint=None) -> None:
        qat_settings(config, checkpoint)
        if config.resume and not (checkpoint and os.path.exists(checkpoint)):
            raise BitsearchError(f"`resume`: no checkpoint at '{checkpoint}'")

    def finalize(self, model, plan, batch, config, show_progress=True, checkpoint=None) -> dict:
        config = resolve_defaults(config)
        settings = qat_settings(config, checkpoint)
        info, qparams, float_weights, start = {}, None, None, None
        if config.init != "rtn":
            # QAT after a learned rounding still matches the float model
            float_weights = {n: model.get_submodule(n).weight.detach().clone() for n in plan.bits}
            t0 = time.time()
            init = get_finalizer(config.init)
            if not isinstance(init, Rounder):
                raise BitsearchError(
                    f"init '{config.init}' is not a rounding method (choose from rtn, {', '.join(rounders())})"
                )
            key = _start_key(config)
            start = checkpointed_start(plan, settings)
            resumed = start is not None
            if resumed and start["key"] != key:
                k = next(k for k in key if start["key"].get(k) != key[k])
                raise BitsearchError(
                    f"checkpoint '{checkpoint}' was made from another start "
                    f"({k}: {start['key'].get(k)!r}, now {key[k]!r})"
                )
            if not resumed:
                qparams = init.round(model, plan, batch, config, show_progress)
                weights = {n: model.get_submodule(n).weight.detach().cpu().clone() for n in plan.bits}
                kept = {n: tuple(t.cpu() for t in v) for n, v in qparams.items()}
                start = {"key": key, "qparams": kept, "weights": weights} if checkpoint else None
            else:  # resumed: the rounding the interrupted run made
                qparams = start["qparams"]
                with torch.no_grad():
                    for n, w in start["weights"].items():
                        model.get_submodule(n).weight.copy_(w)
            info[config.init] = {"seconds": round(time.time() - t0, 1), "resumed": resumed}
        info["qat"] = finalize_qat(
            model,
            plan,
            batch,
            settings,
            show_progress=show_progress,
            init_qparams=qparams,
            float_weights=float_weights,
            start=start,
        )
        convert(model, plan)
        return info
