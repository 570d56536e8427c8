"""Per-channel Hessian trace by Hutchinson's estimator (HAWQ-v2's sensitivity).

For each target row c (an output channel of a Linear, a token's row of an Embedding) let H_c
be the Hessian of the calibration loss L (mean next-token cross-entropy over the whole batch)
w.r.t. that row's weights. For a Rademacher probe v (entries +-1, E[v v^T] = I),
E[v_c^T (H v)_c] = tr(H_c), and (H v) is one double backward: g = dL/dw with
``create_graph=True``, then Hv = d(g . v)/dw. L is a sum of micro-batch terms L_j, so

    T_k = sum_j sum_{i in row c} v_kj,i * (H_j v_kj)_i

is an unbiased estimate of tr(H_c) for any independent probes v_kj, one per probe round k and
micro-batch j, drawn jointly over all target weights from a generator seeded by
(seed, k, j): a run on several ranks sums exactly the terms one process sums. Each
micro-batch's first-order graph is built once and reused for all K rounds; H v is the
vector-Jacobian product of the gradient with v (H is symmetric). Reported per row: ``trace``
(mean of T_k over K rounds), ``trace_se`` (std_k T_k / sqrt(K); 0 when K = 1) and, per layer,
``layer_trace_se`` (the standard error of the layer's total trace, repeated on every row).

The curve is HAWQ's second-order term with the row's Hessian replaced by its mean diagonal:

    e_c(b) = 0.5 * max(tr_c, 0) / n_c * ||w_c - q_b(w_c)||^2,   n_c = in_features,

which is in units of L (``loss_units = True``). The estimate of tr_c can be negative where the
row's Hessian is indefinite or the noise is large; those rows are clipped to 0.

Noise: one round's variance for row c is 2 * sum_{i != l} S_il^2 (S: the symmetrised rows of c
of H, against every probed weight), often many times tr(H_c)^2; on a tiny Llama a 5% per-row
error takes 10^4 to 10^5 rounds. Read ``trace_se`` before trusting a row's ranking.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BitsearchError
from ..progress import progress
from .base import GradientEstimator, LayerCurves, SensitivityContext, register_estimator
from .grad_loss import gradient_session, math_sdpa, micro_batch_loss, target_weights
from .residuals import weighted_sq_errors

__all__ = ["HutchinsonEstimator", "probe_generator"]


def probe_generator(seed: int, k: int, j: int) -> torch.Generator:
    """The CPU generator for probe round k of micro-batch j (independent of rank and device)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(k), int(j)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _rademacher(shapes: list[torch.Size], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 2, s, generator=gen, dtype=torch.int8) for s in shapes]


@register_estimator
class HutchinsonEstimator(GradientEstimator):
    """``probe_chunk`` probe rounds share one vmapped double backward (``is_grads_batched``):
    faster on small models, ``probe_chunk`` times the backward's memory; the result does not
    depend on it."""

    name = "hutchinson"
    loss_units = True

    def __init__(self, probe_chunk: int = 1):
        if probe_chunk < 1:
            raise ValueError(f"probe_chunk must be >= 1, got {probe_chunk}")
        self.probe_chunk = int(probe_chunk)

    def estimate(self, ctx: SensitivityContext) -> dict[str, LayerCurves]:
        n_rounds = int(ctx.probes)
        if n_rounds < 1:
            raise BitsearchError(f"hutchinson needs at least one probe, got {n_rounds}")
        names = [t.name for t in ctx.targets]
        weights = target_weights(ctx.model, names)
        shapes = [w.shape for w in weights]
        dev = ctx.device
        n_tokens = ctx.n_tokens_predicted
        # acc[i][k, c]: round k's estimate of tr(H_c) of target i (this rank's micro-batches)
        acc = [torch.zeros(n_rounds, s[0], dtype=torch.float64, device=dev) for s in shapes]

        with gradient_session(ctx.model, weights, ctx.checkpointing), math_sdpa():
            for j, x in progress(ctx.micro_batches(), desc="hutchinson", enable=ctx.show_progress):
                loss = micro_batch_loss(ctx.model, x.to(dev), n_tokens)
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for k0 in range(0, n_rounds, self.probe_chunk):
                    ks = range(k0, min(k0 + self.probe_chunk, n_rounds))
                    drawn = [_rademacher(shapes, probe_generator(ctx.seed, k, j)) for k in ks]
                    vs = [
                        torch.stack([d[i] for d in drawn]).to(device=dev, dtype=w.dtype).mul_(2).sub_(1)
                        for i, w in enumerate(weights)
                    ]
                    last = ks.stop == n_rounds
                    if len(ks) == 1:
                        hvs = [
                            h.unsqueeze(0)
                            for h in torch.autograd.grad(
                                grads, weights, grad_outputs=[v[0] for v in vs], retain_graph=not last
                            )
                        ]
                    else:
                        hvs = torch.autograd.grad(
                            grads, weights, grad_outputs=vs, retain_graph=not last, is_grads_batched=True
                        )
                    for a, v, hv in zip(acc, vs, hvs):
                        a[ks.start : ks.stop] += (v.double() * hv.double()).sum(-1)
                del grads, loss

        result, rel_se = {}, []
        for name, w, a in zip(names, weights, acc):
            ctx.dist.all_reduce(a)
            a = a.cpu()
            trace = a.mean(0)
            if n_rounds > 1:
                se = a.std(0) / n_rounds**0.5
                layer_se = float(a.sum(1).std()) / n_rounds**0.5
            else:
                se = torch.zeros_like(trace)
                layer_se = 0.0
            total = float(trace.sum())
            rel_se.append(layer_se / abs(total) if total else float("inf"))
            sq = weighted_sq_errors(w, ctx.bits, ctx.group_size)
            scale = 0.5 * trace.clamp(min=0).numpy() / w.shape[1]
            result[name] = LayerCurves(
                errors=sq * scale[:, None],
                metrics={
                    "trace": trace.numpy(),
                    "trace_se": se.numpy(),
                    "layer_trace_se": np.full(w.shape[0], layer_se, dtype=np.float64),
                },
            )
        if n_rounds > 1:
            self.summary = {"layer_rel_se_median": float(np.median(rel_se)), "layer_rel_se_max": float(np.max(rel_se))}
        return result
