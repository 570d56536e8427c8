"""Diagonal empirical Fisher per weight, from per-sample gradients.

For calibration sample s (a row of the batch; N rows) let L_s be its mean next-token
cross-entropy. The diagonal empirical Fisher of weight w_cj is

    F_cj = (1/N) * sum_s (dL_s/dw_cj)^2

and the curve is the second-order loss change with the Hessian replaced by diag(F):

    e_c(b) = 0.5 * T_s * sum_j F_cj * (w_cj - q_b(w)_cj)^2      (``loss_units = True``)

T_s = predicted tokens per sample. The Fisher identity H ~ E[g g^T] holds for per-token
gradients g_t; a sample's gradient averages its T_s token gradients, so with weakly correlated
tokens E_s[(dL_s/dw)^2] ~ (1/T_s) E_t[g_t^2] and the factor T_s restores the unit of the loss.
Rankings within the estimator do not depend on the factor; mixes with other estimators do.

with the metric ``fisher_sum`` = sum_j F_cj. Per-sample gradients come from one backward per
micro-batch: a forward hook keeps each target's input x and output y, autograd gives
G = d(sum_s L_s)/dy, and since rows of a causal LM do not interact, sample s's weight
gradient is sum_t G[s,t]^T x[s,t] for a Linear (an einsum, chunked over samples to bound
memory) and the index_add of G[s,t] into row x[s,t] for an Embedding (x are token ids). A
weight with several uses (an embedding tied to the lm_head) sums its uses' per-sample
gradients before squaring. Accumulators are summed over micro-batches and ranks before the curves are formed.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import BitsearchError
from ..progress import progress
from .base import GradientEstimator, LayerCurves, SensitivityContext, register_estimator
from .grad_loss import output_gradients, per_sample_loss_sum, target_weights
from .residuals import weighted_sq_errors

__all__ = ["FisherEstimator", "collect_fisher", "linear_sq_grad_sum", "embedding_sq_grad_sum", "dense_sq_grad_sum"]

#: elements of the (chunk, out, in) per-sample gradient block formed at once
_CHUNK_ELEMENTS = 1 << 25


def linear_sq_grad_sum(x: torch.Tensor, gy: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += sum_s (gy[s]^T x[s])^2 for x (B, ..., in), gy (B, ..., out); acc (out, in)."""
    b = x.shape[0]
    dt = torch.promote_types(x.dtype, torch.float32)
    x = x.reshape(b, -1, x.shape[-1]).to(dt)
    gy = gy.reshape(b, -1, gy.shape[-1]).to(dt)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, acc.numel()))
    for i in range(0, b, chunk):
        g = torch.einsum("bto,bti->boi", gy[i : i + chunk], x[i : i + chunk])
        acc += g.pow(2).sum(0).to(acc.dtype)


def embedding_sq_grad_sum(ids: torch.Tensor, gy: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += sum_s G_s^2, G_s[v] = sum of gy[s, t] over positions t with ids[s, t] == v; ids (B, ...),
    gy (B, ..., dim), acc (vocab, dim). Only the (sample, token) pairs present are formed."""
    b = ids.shape[0]
    vocab = acc.shape[0]
    ids = ids.reshape(b, -1).long()
    gy = gy.reshape(b, ids.shape[1], -1).to(torch.promote_types(gy.dtype, torch.float32))
    keys = (torch.arange(b, device=ids.device)[:, None] * vocab + ids).reshape(-1)
    uniq, inv = torch.unique(keys, return_inverse=True)
    g = torch.zeros(uniq.numel(), gy.shape[-1], dtype=gy.dtype, device=gy.device)
    g.index_add_(0, inv, gy.reshape(-1, gy.shape[-1]))
    acc.index_add_(0, uniq % vocab, g.pow(2).to(acc.dtype))


def dense_sq_grad_sum(uses: list[tuple[str, torch.Tensor, torch.Tensor]], acc: torch.Tensor) -> None:
    """acc += sum_s G_s^2 where G_s sums sample s's gradient over several uses of one weight
    (a tied embedding and lm_head, a module called twice): each use is ("linear", x, gy) or
    ("embedding", ids, gy). Forms (chunk, out, in) per-sample gradients."""
    b = uses[0][1].shape[0]
    rows, cols = acc.shape
    dt = torch.promote_types(uses[0][2].dtype, torch.float32)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, acc.numel()))
    for i in range(0, b, chunk):
        c = min(chunk, b - i)
        g = torch.zeros(c, rows, cols, dtype=dt, device=acc.device)
        for kind, inp, gy in uses:
            gy = gy[i : i + c].reshape(c, -1, gy.shape[-1]).to(dt)
            if kind == "embedding":
                ids = inp[i : i + c].reshape(c, -1).long()
                keys = (torch.arange(c, device=ids.device)[:, None] * rows + ids).reshape(-1)
                g.view(c * rows, cols).index_add_(0, keys, gy.reshape(-1, cols))
            else:
                g += torch.einsum("bto,bti->boi", gy, inp[i : i + c].reshape(c, -1, cols).to(dt))
        acc += g.pow(2).sum(0).to(acc.dtype)


def collect_fisher(ctx: SensitivityContext) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher (out, in) of every target weight, float64 on the CPU,
    summed over ranks. A weight used by several modules (a tied lm_head) gets the Fisher of
    the weight itself: per-sample gradients of all its uses are added before squaring."""
    names = [t.name for t in ctx.targets]
    dev = ctx.device
    acc = [torch.zeros(w.shape, dtype=torch.float64, device=dev) for w in target_weights(ctx.model, names)]
    batches = (x.to(dev) for _j, x in progress(ctx.micro_batches(), desc="fisher", enable=ctx.show_progress))
    passes = output_gradients(ctx.model, names, batches, lambda x: per_sample_loss_sum(ctx.model, x), ctx.checkpointing)
    with contextlib.closing(passes):  # hooks removed even when a check below raises
        for x, calls in passes:
            for i, uses in enumerate(calls):
                for _kind, inp, _gy in uses:
                    if inp.shape[0] != x.shape[0]:
                        raise BitsearchError(
                            f"fisher: target '{names[i]}' does not see the batch as its "
                            f"first dimension (input shape {tuple(inp.shape)})"
                        )
                if len(uses) > 1:
                    dense_sq_grad_sum(uses, acc[i])
                elif uses and uses[0][0] == "embedding":
                    embedding_sq_grad_sum(uses[0][1], uses[0][2], acc[i])
                elif uses:
                    linear_sq_grad_sum(uses[0][1], uses[0][2], acc[i])
    n = ctx.batch.shape[0]
    return {name: ctx.dist.all_reduce(a).cpu() / n for name, a in zip(names, acc)}


@register_estimator
class FisherEstimator(GradientEstimator):
    name = "fisher"
    loss_units = True

    def estimate(self, ctx: SensitivityContext) -> dict[str, LayerCurves]:
        fisher = collect_fisher(ctx)
        tokens_per_sample = ctx.batch.shape[1] - 1
        self.summary = {"tokens_per_sample_factor": tokens_per_sample}
        result = {}
        for t in ctx.targets:
            w = ctx.model.get_submodule(t.name).weight
            f = fisher[t.name]
            result[t.name] = LayerCurves(
                errors=0.5 * tokens_per_sample * weighted_sq_errors(w, ctx.bits, ctx.group_size, f),
                metrics={"fisher_sum": f.sum(1).numpy()},
            )
        return result
