"""Every layer's loss response to a weight perturbation from one forward+backward ("gradient").

The layer-loss calibration (``calibrate.py``) measures, for each target l alone, the loss
increase dL_l when its weight W_l moves by a perturbation D_l (round-to-nearest at the
reference width, or some rows pruned). Measured exactly that costs a pass through the later
blocks per target. Here every target's dL_l is predicted from ONE forward+backward.

Let y = W x be a target's output at token t of calibration sample s, G_st = d(sum of the
sample's next-token NLLs)/dy_st from the backward, and dy_st = D x_st the change D makes to
that output (for an Embedding, dy_st = D[id_st]). The per-sample first-order change of the
sample's summed NLL is

    u_s = sum_t G_st . dy_st                       (= T * g_s . D, g_s = grad of the sample's mean NLL)

and with the empirical Fisher of the per-sample gradients, scaled by the T predicted tokens
per sample as in ``fisher.py``, H ~ T * mean_s g_s g_s^T, the second-order prediction of the
mean-NLL increase over N samples is

    dL = g . D + 1/2 D^T H D = (sum_s u_s + 1/2 sum_s u_s^2) / (N T).

Only the output gradients and the inputs every backward has anyway are used; the extra work
per target is one product D x (one more forward of that layer; a pruning probe costs only its
rows). Cost does not depend on depth x targets. ``labels="sampled"`` replaces the data's
next tokens by tokens drawn from the model's own predictions: then E[u_s^2] is exactly the
Gauss-Newton quadratic form of D (tokens' scores are independent with mean zero) and the
first-order term averages to zero.

A weight used by several modules (a tied embedding and lm_head) adds the changes of all its
uses before squaring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Dist
from ..errors import BitsearchError
from ..models import Target
from ..progress import progress
from ..quant.grid import fake_quantize
from .grad_loss import output_gradients

__all__ = ["Probe", "probe_sums", "predicted_increase", "gradient_responses", "LABELS"]

LABELS = ("data", "sampled")


@dataclass
class Probe:
    """A perturbation of one target's weight: ``delta`` (len(rows), in) added to ``rows`` of the
    weight (``rows`` None: every row, ``delta`` of the weight's shape)."""

    delta: torch.Tensor
    rows: torch.Tensor | None = None


def _change(kind: str, inp: torch.Tensor, probe: Probe, n_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dy restricted to the probe's rows, those rows) for one use of the weight."""
    if kind == "embedding":
        if probe.rows is None:
            return F.embedding(inp, probe.delta), None
        full = torch.zeros(n_rows, probe.delta.shape[1], dtype=probe.delta.dtype, device=probe.delta.device)
        full[probe.rows] = probe.delta
        return F.embedding(inp, full), None
    return F.linear(inp.to(probe.delta.dtype), probe.delta), probe.rows


def _per_sample_nll(model: nn.Module, x: torch.Tensor, labels: str, gen: torch.Generator | None) -> torch.Tensor:
    """Summed next-token NLL of the rows of ``x`` (one scalar: the rows' sums added; rows of a
    causal LM do not interact, so its gradient w.r.t. row s's activations is row s's own)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat = logits.reshape(-1, logits.shape[-1])
    if labels == "sampled":
        with torch.no_grad():
            tgt = torch.multinomial(flat.detach().softmax(-1).cpu(), 1, generator=gen).view(-1).to(flat.device)
    else:
        tgt = x[:, 1:].reshape(-1)
    return F.cross_entropy(flat, tgt, reduction="sum")


def probe_sums(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    probes: dict[str, list[Probe]],
    micro_batch: int = 8,
    labels: str = "data",
    seed: int = 0,
    checkpointing: bool = False,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> dict[str, np.ndarray]:
    """u_s of every probe: {target: (n_probes, N) float64}, N = rows of ``batch`` (all ranks)."""
    if labels not in LABELS:
        raise BitsearchError(f"unknown labels '{labels}' (choose from {', '.join(LABELS)})")
    dist = dist or Dist()
    names = [t.name for t in targets if probes.get(t.name)]
    n_rows = [model.get_submodule(name).weight.shape[0] for name in names]
    dev = next(model.parameters()).device
    n = batch.shape[0]
    sums = {name: torch.zeros(len(probes[name]), n, dtype=torch.float64) for name in names}
    gen = torch.Generator().manual_seed(seed) if labels == "sampled" else None
    owned = [j for j in range(0, n, micro_batch) if dist.owns(j // micro_batch)]
    starts = iter(owned)
    batches = (
        batch[j : j + micro_batch].to(dev)
        for j in progress(owned, desc=f"gradient response ({labels})", enable=show_progress and dist.is_main)
    )
    passes = output_gradients(model, names, batches, lambda x: _per_sample_nll(model, x, labels, gen), checkpointing)
    with contextlib.closing(passes):  # hooks removed even when a check below raises
        for x, calls in passes:
            j = next(starts)
            with torch.no_grad():
                for i, uses in enumerate(calls):
                    name = names[i]
                    acc = torch.zeros(len(probes[name]), x.shape[0], dtype=torch.float64, device=dev)
                    for kind, inp, gy in uses:
                        if inp.shape[0] not in (x.shape[0], x.numel()):  # (B, T, ..) or (B * T, ..)
                            raise BitsearchError(
                                f"gradient response: target '{name}' does not see the batch "
                                f"as its first dimension (input shape {tuple(inp.shape)})"
                            )
                        gy = gy.reshape(x.shape[0], -1, gy.shape[-1])
                        for k, p in enumerate(probes[name]):
                            dy, rows = _change(kind, inp, p, n_rows[i])
                            dy = dy.reshape(x.shape[0], -1, dy.shape[-1])
                            g = gy if rows is None else gy[..., rows]
                            acc[k] += (g.to(dy.dtype) * dy).sum((1, 2)).double()
                    sums[name][:, j : j + x.shape[0]] += acc.cpu()
    return {name: dist.all_reduce(s).numpy() for name, s in sums.items()}


def predicted_increase(u: np.ndarray, tokens_per_sample: int, first_order: bool = True) -> np.ndarray:
    """dL = (sum_s u_s + 1/2 sum_s u_s^2) / (N T) per probe (row of ``u``: (n_probes, N)); without
    ``first_order`` only the second-order term."""
    u = np.atleast_2d(u)
    quad = 0.5 * (u**2).sum(-1)
    lin = u.sum(-1) if first_order else 0.0
    return (lin + quad) / (u.shape[-1] * tokens_per_sample)


def gradient_responses(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    ref_bits: int,
    group_size: int,
    prune: dict[str, dict[str, np.ndarray]] | None = None,
    micro_batch: int = 8,
    checkpointing: bool = False,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Predicted calibration-loss increase of each target alone at ``ref_bits`` (round-to-nearest),
    and, for each key of ``prune`` ({key: {target: rows}}), of pruning those rows of each target
    alone: (responses, {key: responses}), all from one forward+backward over ``batch``."""
    modules = dict(model.named_modules())
    prune = prune or {}
    probes: dict[str, list[Probe]] = {}
    for t in targets:
        w = modules[t.name].weight.detach()
        wf = w.float()
        probes[t.name] = [Probe(fake_quantize(wf, ref_bits, group_size) - wf)]
        for rows in prune.values():
            r = torch.as_tensor(rows[t.name], dtype=torch.long, device=w.device)
            probes[t.name].append(Probe(-wf[r], r))
    u = probe_sums(
        model, targets, batch, probes, micro_batch, checkpointing=checkpointing, show_progress=show_progress, dist=dist
    )
    tokens = batch.shape[1] - 1
    dl = {name: predicted_increase(v, tokens) for name, v in u.items()}
    return (
        {t.name: float(dl[t.name][0]) for t in targets},
        {key: {t.name: float(dl[t.name][1 + k]) for t in targets} for k, key in enumerate(prune)},
    )
