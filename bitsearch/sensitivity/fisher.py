"""Diagonal empirical Fisher per weight, from per-sample gradients.

For calibration sample s (a row of the batch; N rows) let L_s be its mean next-token
cross-entropy. The diagonal empirical Fisher of weight w_cj is

    F_cj = (1/N) * sum_s (dL_s/dw_cj)^2

and the curve is the second-order loss change with the Hessian replaced by diag(F):

    e_c(b) = 0.5 * sum_j F_cj * (w_cj - q_b(w)_cj)^2            (``loss_units = True``)

with the metric ``fisher_sum`` = sum_j F_cj. Per-sample gradients come from one backward per
micro-batch: a forward hook keeps each target's input x and output y, autograd gives
G = d(sum_s L_s)/dy, and since rows of a causal LM do not interact, sample s's weight
gradient is sum_t G[s,t]^T x[s,t] for a Linear (an einsum, chunked over samples to bound
memory) and the index_add of G[s,t] into row x[s,t] for an Embedding (x are token ids).
Accumulators are summed over micro-batches and ranks before the curves are formed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BitsearchError
from ..progress import progress
from .base import GradientEstimator, LayerCurves, SensitivityContext, register_estimator
from .grad_loss import gradient_session, per_sample_loss_sum, target_weights, weighted_sq_errors

__all__ = ["FisherEstimator", "linear_sq_grad_sum", "embedding_sq_grad_sum"]

#: elements of the (chunk, out, in) per-sample gradient block formed at once
_CHUNK_ELEMENTS = 1 << 25


def linear_sq_grad_sum(x: torch.Tensor, gy: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += sum_s (gy[s]^T x[s])^2 for x (B, ..., in), gy (B, ..., out); acc (out, in)."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1]).float()
    gy = gy.reshape(b, -1, gy.shape[-1]).float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, acc.numel()))
    for i in range(0, b, chunk):
        g = torch.einsum("bto,bti->boi", gy[i:i + chunk], x[i:i + chunk])
        acc += g.pow(2).sum(0).to(acc.dtype)


def embedding_sq_grad_sum(ids: torch.Tensor, gy: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += sum_s G_s^2, G_s[v] = sum of gy[s, t] over positions t with ids[s, t] == v; ids (B, ...),
    gy (B, ..., dim), acc (vocab, dim). Only the (sample, token) pairs present are formed."""
    b = ids.shape[0]
    vocab = acc.shape[0]
    ids = ids.reshape(b, -1).long()
    gy = gy.reshape(b, ids.shape[1], -1).float()
    keys = (torch.arange(b, device=ids.device)[:, None] * vocab + ids).reshape(-1)
    uniq, inv = torch.unique(keys, return_inverse=True)
    g = torch.zeros(uniq.numel(), gy.shape[-1], dtype=gy.dtype, device=gy.device)
    g.index_add_(0, inv, gy.reshape(-1, gy.shape[-1]))
    acc.index_add_(0, uniq % vocab, g.pow(2).to(acc.dtype))


def _check_untied(model: nn.Module, names: list[str]) -> None:
    """Hooks see only the target module's use of its weight: refuse a weight used elsewhere."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rsplit(".", 1)[0])
    for name in names:
        others = [o for o in owners.get(id(model.get_submodule(name).weight), []) if o != name]
        if others:
            raise BitsearchError(f"fisher: target '{name}' shares its weight with '{others[0]}' (tied weights)")


@register_estimator
class FisherEstimator(GradientEstimator):
    name = "fisher"
    loss_units = True

    def estimate(self, ctx: SensitivityContext) -> dict[str, LayerCurves]:
        names = [t.name for t in ctx.targets]
        _check_untied(ctx.model, names)
        weights = target_weights(ctx.model, names)
        modules = [ctx.model.get_submodule(n) for n in names]
        dev = ctx.device
        acc = [torch.zeros(w.shape, dtype=torch.float64, device=dev) for w in weights]
        seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in names]
        recording = [False]  # off during backward, where checkpointing re-runs the forwards

        def hook(i):
            def fn(_mod, args, out):
                if recording[0]:
                    seen[i].append((args[0].detach(), out))
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        try:
            with gradient_session(ctx.model, weights, ctx.checkpointing):
                for _j, x in progress(ctx.micro_batches(), desc="fisher", enable=ctx.show_progress):
                    x = x.to(dev)
                    recording[0] = True
                    try:
                        loss = per_sample_loss_sum(ctx.model, x)
                    finally:
                        recording[0] = False
                    calls = [(i, inp, out) for i, s in enumerate(seen) for inp, out in s]
                    for s in seen:
                        s.clear()
                    grads = torch.autograd.grad(loss, [out for _i, _inp, out in calls], allow_unused=True)
                    for (i, inp, out), gy in zip(calls, grads):
                        if gy is None:
                            continue
                        if inp.shape[0] != x.shape[0]:
                            raise BitsearchError(f"fisher: target '{names[i]}' does not see the batch as its "
                                                 f"first dimension (input shape {tuple(inp.shape)})")
                        if isinstance(modules[i], nn.Embedding):
                            embedding_sq_grad_sum(inp, gy, acc[i])
                        else:
                            linear_sq_grad_sum(inp, gy, acc[i])
                    del loss, grads, calls
        finally:
            for h in handles:
                h.remove()
            for s in seen:
                s.clear()

        n = ctx.batch.shape[0]
        result = {}
        for name, w, a in zip(names, weights, acc):
            ctx.dist.all_reduce(a)
            fisher = (a / n).cpu()
            result[name] = LayerCurves(
                errors=0.5 * weighted_sq_errors(w, ctx.bits, ctx.group_size, fisher),
                metrics={"fisher_sum": fisher.sum(1).numpy()})
        return result
