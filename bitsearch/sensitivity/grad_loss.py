"""Shared pieces of the gradient estimators (``fisher``, ``hutchinson``).

The calibration loss is L = (1/T) * sum of the next-token cross-entropies over the WHOLE
calibration batch (T = ``ctx.n_tokens_predicted``). :func:`micro_batch_loss` returns one
micro-batch's share of it (its CE sum over T), so summing over micro-batches and ranks gives
L, its gradient and its Hessian exactly.

:func:`gradient_session` puts the model in the state the passes need and restores it after:
eval mode, only the target weights requiring grad, optionally activation checkpointing of the
decoder blocks. Checkpointing wraps each block's ``forward`` in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` rather than calling HF's
``gradient_checkpointing_enable()``: HF checkpoints only in training mode (which turns on the
dropout some families, e.g. OPT, apply in the block's own ``forward``) and leaves a
``requires_grad`` hook on the input embeddings after ``..._disable()``. Non-reentrant
checkpointing supports double backward (Hessian-vector products); the reentrant one does not
support ``torch.autograd.grad`` at all.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsearchError

__all__ = [
    "micro_batch_loss",
    "per_sample_loss_sum",
    "gradient_session",
    "math_sdpa",
    "target_weights",
    "weight_users",
    "output_gradients",
]


def _logits_targets(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in float32; float64 models keep float64
    return logits, x[:, 1:]


def micro_batch_loss(model: nn.Module, x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum of the next-token cross-entropies of micro-batch ``x`` (B, S) divided by ``n_tokens``
    (the whole calibration batch's count), so micro-batch losses add up to L."""
    logits, tgt = _logits_targets(model, x)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    return ce / n_tokens


def per_sample_loss_sum(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sum_s L_s over the rows s of ``x``, L_s being row s's mean next-token cross-entropy. Rows
    do not interact in a causal LM, so the gradient of this sum w.r.t. a row's activations is
    that row's own dL_s."""
    logits, tgt = _logits_targets(model, x)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    return ce / tgt.shape[1]


def math_sdpa() -> contextlib.AbstractContextManager:
    """The math SDPA kernel: the fused CPU/CUDA kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def target_weights(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The weight of each target (an ``nn.Linear`` or ``nn.Embedding``), in order."""
    out = []
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            raise BitsearchError(f"target '{name}' is a {type(mod).__name__}, not a Linear or Embedding")
        out.append(mod.weight)
    return out


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    from ..models import decoder_blocks

    return decoder_blocks(model)[1]


@contextlib.contextmanager
def gradient_session(model: nn.Module, weights: list[nn.Parameter], checkpointing: bool = False) -> Iterator[None]:
    """Eval mode, only ``weights`` requiring grad, decoder blocks checkpointed if asked; every
    module's mode, every parameter's flag and every block's ``forward`` restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wrapped: list[nn.Module] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        if checkpointing:
            from torch.utils.checkpoint import checkpoint

            for block in _decoder_blocks(model):
                if "forward" in vars(block):
                    raise BitsearchError(f"cannot checkpoint {type(block).__name__}: its forward is already patched")
                block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
                wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def weight_users(model: nn.Module, weight: nn.Parameter, name: str) -> list[tuple[nn.Module, str]]:
    """Every module using ``weight`` (the target and, e.g., a tied lm_head), with its kind
    ("linear" or "embedding")."""
    out, seen = [], set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        if getattr(mod, "weight", None) is not weight or id(mod) in seen:
            continue
        seen.add(id(mod))
        if isinstance(mod, nn.Embedding):
            out.append((mod, "embedding"))
        elif isinstance(mod, nn.Linear):
            out.append((mod, "linear"))
        else:
            raise BitsearchError(
                f"the weight of target '{name}' is also used by '{mname}', a "
                f"{type(mod).__name__} (only Linear and Embedding users are supported)"
            )
    return out


UseGrads = list[tuple[str, torch.Tensor, torch.Tensor]]


def output_gradients(
    model: nn.Module,
    names: list[str],
    batches,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    checkpointing: bool = False,
) -> Iterator[tuple[torch.Tensor, list[UseGrads]]]:
    """For each micro-batch x of ``batches`` (already on the model's device): (x, uses), where
    uses[i] lists (kind, input, d loss_fn(x) / d output) for every call of target ``names[i]``'s
    weight in the forward (a tied weight: each of its modules). One forward and one backward per
    micro-batch; only the targets' outputs get gradients. Hooks removed and the model's state
    restored (``gradient_session``) when the iteration ends."""
    weights = target_weights(model, names)
    seen: list[UseGrads] = [[] for _ in names]
    recording = [False]  # off during backward, where checkpointing re-runs the forwards

    def hook(i, kind):
        def fn(_mod, args, out):
            if recording[0]:
                seen[i].append((kind, args[0].detach(), out))

        return fn

    handles = []
    try:
        for i, (name, w) in enumerate(zip(names, weights)):
            for mod, kind in weight_users(model, w, name):
                handles.append(mod.register_forward_hook(hook(i, kind)))
        with gradient_session(model, weights, checkpointing):
            for x in batches:
                recording[0] = True
                try:
                    loss = loss_fn(x)
                finally:
                    recording[0] = False
                calls = [list(s) for s in seen]
                for s in seen:
                    s.clear()
                outs = [out for c in calls for _k, _inp, out in c]
                grads = iter(torch.autograd.grad(loss, outs, allow_unused=True))
                del loss
                uses = [
                    [(kind, inp, g) for kind, inp, _out in c for g in [next(grads)] if g is not None] for c in calls
                ]
                del calls, outs, grads
                yield x, uses
    finally:
        for h in handles:
            h.remove()
        for s in seen:
            s.clear()
