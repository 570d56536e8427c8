"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) on bitsearch's grid and per-row widths: a finalizer of any plan.

The algorithm is the reference ``fasterquant`` loop with static groups:

* Hessian: H = 2 X X^T / n over the calibration tokens entering each target ``nn.Linear``
  (the scale of H does not change the result), collected by
  :class:`~bitsearch.sensitivity.stats.InputStats` (``kind="full"``). Blocks are processed in
  order (:class:`~bitsearch.blocks.BlockRunner`), each on the outputs of the
  already quantized blocks before it; inside a block, with ``true_sequential`` the layers are
  quantized in groups of layers that read the same input tensor (Llama: q/k/v, o, gate/up,
  down), each group's Hessians taken with the earlier groups already quantized. The groups are
  found structurally (InputStats' aliases of one forward), not from a per-architecture table.
* Dead inputs (H_ii = 0): H_ii = 1 and the column of W set to 0.
* Damping: H += percdamp * mean(diag H) * I (after the dead-input fix). If the Cholesky
  factorisation still fails, the damping fraction becomes max(percdamp, 0.001) * 10^k for
  k = 1..4 until it succeeds (the damping used is in ``GPTQResult.info``).
* Act order (``act_order``): columns are processed by decreasing diag H.
* Static groups (``static_groups``): the grid of every group of G *consecutive original*
  columns is chosen before the loop, on the (dead-zeroed) float weights, so with act order the
  groups are still contiguous in the stored column order (one fp16 scale and one uint8 zero per
  row and group of G consecutive columns; no g_idx). Without static groups (and without act
  order) each group's grid is chosen when the loop reaches its first column, on the weights
  updated by the error feedback so far. Act order without static groups is refused.
* Lazy batch updates (``blocksize`` columns at a time) and the upper Cholesky factor of H^-1.

The grid is :mod:`bitsearch.quant.grid`'s: per row and group, lo = min(min(w), 0),
hi = max(max(w), 0), scale = f16((hi - lo) / (2^b - 1)), zero = clamp(round(-lo / scale)) as a
uint8, codes clamp(round(w / scale) + zero, 0, 2^b - 1). Every row has its own width from the
plan (rows of different widths share H and are quantized in one pass); rows at width 0 become 0
and rows at 16 the weight rounded to float16 (neither takes part in the error feedback).
Targets outside the decoder blocks (embeddings, a tied or untied lm_head) get round-to-nearest,
before the blocks' inputs are captured. Like SignRound, :func:`gptq_quantize` writes each
target's dequantized weight into the model in place and returns per layer the (scales float16,
zeros uint8) to pack it with: ``apply.pack_model(model, plan, qparams=result)`` then stores
exactly GPTQ's codes and ``plan.n_bytes()`` bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..blocks import BlockRunner, names_by_block
from ..errors import BitsearchError
from ..io.plan import BitPlan
from ..progress import progress
from ..quant.grid import KEEP_WIDTH, QUANT_WIDTHS, choose_qparams, dequantize, n_groups, quantize
from ..quantize import fake_quantize_model, plan_targets
from ..sensitivity.stats import InputStats
from .base import Rounder, register_finalizer
from .signround import minmax_qparams

__all__ = ["GPTQSettings", "GPTQResult", "gptq_layer", "gptq_quantize", "sequential_groups"]


@dataclass
class GPTQSettings:
    """Options of :func:`gptq_quantize` (defaults: the reference's, with act order and static groups)."""

    percdamp: float = field(default=0.01, metadata={"help": "damping, a fraction of mean(diag H)"})
    act_order: bool = field(default=True, metadata={"help": "columns by decreasing diag H"})
    static_groups: bool = field(
        default=True,
        metadata={"help": "every group's grid chosen before the loop on the float weights (needed with act order)"},
    )
    blocksize: int = field(default=128, metadata={"help": "columns per lazy batch update"})
    micro_batch: int = field(default=8, metadata={"help": "calibration samples per block forward"})
    true_sequential: bool = field(
        default=True,
        metadata={"help": "Hessians of each layer group taken after the earlier groups of the block are quantized"},
    )

    def __post_init__(self):
        if not (0 <= self.percdamp < math.inf) or self.micro_batch < 1 or self.blocksize < 1:
            raise BitsearchError("gptq: percdamp must be >= 0, micro_batch and blocksize >= 1")

    def check(self, plan: BitPlan) -> None:
        if (
            self.act_order
            and not self.static_groups
            and plan.group_size != -1
            and any(n_groups(i, plan.group_size) > 1 for _, i in plan.shapes.values())
        ):
            raise BitsearchError("gptq: act order needs static groups to be stored in bitsearch's format")


MAX_DAMP_RETRIES = 4


def _row_qparams(w: torch.Tensor, bits: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's (scales f16, zeros u8) (R, n_groups) of rows ``w`` at their widths ``bits`` (R,)."""
    ng = n_groups(w.shape[1], group_size)
    scales = torch.empty(w.shape[0], ng, dtype=torch.float16, device=w.device)
    zeros = torch.empty(w.shape[0], ng, dtype=torch.uint8, device=w.device)
    for b in torch.unique(bits).tolist():
        rows = (bits == b).nonzero().flatten()
        scales[rows], zeros[rows] = choose_qparams(w[rows], int(b), group_size)
    return scales, zeros


def _fake_quant(
    w: torch.Tensor, s: torch.Tensor, s_safe: torch.Tensor, z: torch.Tensor, qmax: torch.Tensor
) -> torch.Tensor:
    """(clamp(round(w / s) + z, 0, qmax) - z) * s with the grid's operations (all (R,) tensors)."""
    q = torch.minimum((torch.round(w / s_safe) + z).clamp_(min=0), qmax)
    return (q - z) * s


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1 with damp = percdamp * mean(diag H); on failure the
    fraction becomes max(percdamp, 0.001) * 10^attempt."""
    mean_diag = torch.mean(torch.diag(H)).item()
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        frac = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10**attempt
        damp = frac * mean_diag
        Hd = H.clone()
        Hd[idx, idx] += damp
        try:
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            if attempt == MAX_DAMP_RETRIES:
                raise BitsearchError(
                    f"gptq: the Hessian is not positive definite even with damping {damp:.3g}"
                ) from None
    raise AssertionError("unreachable")


@torch.no_grad()
def gptq_layer(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits,
    group_size: int,
    *,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GPTQ of rows ``weight`` (R, K), every row at its width ``bits`` (R,) in 2..8, given the
    Hessian ``H`` (K, K) of the layer's inputs (``fasterquant``; computed in ``weight``'s dtype).

    Returns (w_hat (R, K) dequantized, in ``weight``'s dtype; scales float16 (R, n_groups);
    zeros uint8 (R, n_groups); info {"loss": the reference's summed loss, "damp": the damping
    added, "dead": dead inputs})."""
    W = weight.detach().clone()
    if not W.is_floating_point():
        W = W.float()
    dtype, dev = W.dtype, W.device
    R, K = W.shape
    H = H.detach().to(dev, dtype).clone()
    bits = torch.as_tensor(bits).to(dev).long()
    if bits.shape != (R,) or (R and (bits.min() < QUANT_WIDTHS[0] or bits.max() > QUANT_WIDTHS[-1])):
        raise ValueError("gptq_layer: bits must give one width in 2..8 per row")
    G = K if group_size == -1 or group_size >= K else int(group_size)
    ng = n_groups(K, group_size)
    if blocksize < 1:
        raise ValueError("gptq_layer: blocksize must be >= 1")
    static = static_groups or ng == 1
    if act_order and not static:
        raise BitsearchError(
            "gptq: act order needs static groups to be stored in bitsearch's format (groups of consecutive columns)"
        )
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    qmax = 2.0 ** bits.to(dtype) - 1
    if static:
        scales, zeros = _row_qparams(W, bits, G)
    else:
        scales = torch.empty(R, ng, dtype=torch.float16, device=dev)
        zeros = torch.empty(R, ng, dtype=torch.uint8, device=dev)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp = _inverse_cholesky(H, percdamp)
    del H
    if static:
        cols = perm if perm is not None else torch.arange(K, device=dev)
        S = scales.to(dtype)[:, cols // G]  # (R, K), processing order
        Z = zeros.to(dtype)[:, cols // G]
        S_safe = torch.where(S > 0, S, torch.ones_like(S))
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=dtype, device=dev)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                s, s_safe, z = S[:, j], S_safe[:, j], Z[:, j]
            elif j % G == 0:  # a new group: its grid on the current (error-updated) weights
                e = min(j + G, K)
                cur = W1[:, i : min(e, i2) - i1]
                if e > i2:  # the group reaches past the lazy block: add the pending update
                    cur = torch.cat([cur, W[:, i2:e] - Err1[:, :i] @ Hinv[i1:j, i2:e]], dim=1)
                sc, zc = _row_qparams(cur, bits, -1)
                scales[:, j // G], zeros[:, j // G] = sc[:, 0], zc[:, 0]
                s, z = sc[:, 0].to(dtype), zc[:, 0].to(dtype)
                s_safe = torch.where(s > 0, s, torch.ones_like(s))
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _fake_quant(w, s, s_safe, z, qmax)
            Q1[:, i] = q
            err = (w - q) / d
            loss += (err * err).sum() / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scales, zeros, {"loss": float(loss), "damp": damp, "dead": int(dead.sum())}


@torch.no_grad()
def _quantize_rows(
    weight: torch.Tensor, H: torch.Tensor | None, bits: np.ndarray, group_size: int, opts: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """A whole target at per-row widths: GPTQ on rows at 2..8 (RTN when ``H`` is None), 0 on rows
    at 0, float16 rounding on rows at 16. Returns (w_hat (float32, float64 for a float64 weight),
    scales, zeros, info)."""
    w = weight.detach()
    w = w if w.dtype == torch.float64 else w.float()
    b = torch.as_tensor(bits).to(w.device).long()
    keep = (b == KEEP_WIDTH).unsqueeze(1)
    out = torch.where(keep, w.half().to(w.dtype), torch.zeros_like(w))
    ng = n_groups(w.shape[1], group_size)
    scales = torch.ones(w.shape[0], ng, dtype=torch.float16, device=w.device)
    zeros = torch.zeros(w.shape[0], ng, dtype=torch.uint8, device=w.device)
    rows = ((b >= QUANT_WIDTHS[0]) & (b <= QUANT_WIDTHS[-1])).nonzero().flatten()
    info = {"loss": 0.0, "damp": 0.0, "dead": 0, "rtn": H is None}
    if rows.numel():
        if H is None:  # never called in the calibration forward: round-to-nearest
            s, z = _row_qparams(w[rows], b[rows], group_size)
            q = torch.empty_like(w[rows])
            for width in torch.unique(b[rows]).tolist():
                sub = (b[rows] == width).nonzero().flatten()
                q[sub] = dequantize(
                    quantize(w[rows][sub], s[sub], z[sub], width, group_size), s[sub], z[sub], group_size, dtype=w.dtype
                )
        else:
            q, s, z, i = gptq_layer(w[rows], H, b[rows], group_size, **opts)
            info.update(i)
        out[rows], scales[rows], zeros[rows] = q.to(w.dtype), s, z
    return out, scales, zeros, info


class GPTQResult(dict):
    """{layer name: (scales float16 (R, n_groups), zeros uint8 (R, n_groups))} on the CPU (1 and
    0 on rows not at a width 2..8), plus per layer ``info`` {"loss", "damp", "dead", "rtn"},
    ``groups`` (per decoder block, the layer groups quantized in turn) and ``seconds``."""

    def __init__(self):
        super().__init__()
        self.info: dict[str, dict] = {}
        self.groups: list[list[list[str]]] = []
        self.seconds = 0.0


@torch.no_grad()
def sequential_groups(
    runner: BlockRunner, block: nn.Module, names: list[str], modules: dict, h: torch.Tensor, kw: dict
) -> list[list[str]]:
    """The targets ``names`` of ``block`` in groups of layers reading the same input tensor, in the
    order of the forward pass (one forward of ``block`` on ``h``); targets never called come last."""
    with InputStats({n: modules[n] for n in names}, "diag") as st:
        runner.run_block(block, h, kw)
    groups = [[owner] + [n for n in names if st.alias.get(n) == owner] for owner in st.sums]
    never = [n for n in names if n not in st.sums and n not in st.alias]
    return groups + ([never] if never else [])


@torch.no_grad()
def _hessians(
    runner: BlockRunner,
    block: nn.Module,
    group: list[str],
    modules: dict,
    hs: list[torch.Tensor],
    kws: list[dict],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor | None]:
    """H = 2 X X^T / n of every layer of ``group`` over the micro-batches ``hs`` (None: never called)."""
    with InputStats({n: modules[n] for n in group}, "full") as st:
        for h, kw in zip(hs, kws):
            runner.run_block(block, h, kw)
            st.end_pass()
    out = {}
    for n in group:
        owner = st.alias.get(n, n)
        out[n] = (st.total(n) * (2.0 / st.counts[owner])).to(dtype) if owner in st.sums else None
    return out


def gptq_quantize(
    model: nn.Module,
    plan: BitPlan,
    batch: torch.Tensor,
    settings: GPTQSettings | None = None,
    *,
    offload: bool = False,
    show_progress: bool = True,
) -> GPTQResult:
    """Quantize ``model`` under ``plan`` with GPTQ on the calibration token ids ``batch`` (N, T), in
    place (each target weight becomes its dequantized values); returns the scales and zeros to
    pack each target with (see :class:`GPTQResult`). ``offload``: the decoder blocks are on the
    CPU and run on the device of the embeddings one at a time."""
    t0 = time.perf_counter()
    s = settings or GPTQSettings()
    if getattr(plan, "couplings", None):
        raise BitsearchError("gptq: plans with coupled pruning are not supported")
    batch = torch.as_tensor(batch)
    if batch.dim() != 2 or batch.shape[0] == 0 or batch.shape[1] == 0:
        raise BitsearchError(f"gptq: the calibration batch must be token ids (N, T), not {tuple(batch.shape)}")
    s.check(plan)
    opts = dict(percdamp=s.percdamp, act_order=s.act_order, static_groups=s.static_groups, blocksize=s.blocksize)
    targets = plan_targets(model, plan, "gptq")
    runner = BlockRunner(model, offload=offload)
    modules = dict(model.named_modules())
    by_block = names_by_block(runner, [t.name for t in targets])
    result = GPTQResult()
    was_training = model.training
    model.eval()

    def write(name: str, H: torch.Tensor | None) -> None:
        weight = modules[name].weight
        w_hat, sc, z, info = _quantize_rows(weight, H, plan.bits[name], plan.group_size, opts)
        weight.data.copy_(w_hat.to(weight.dtype))
        result[name] = (sc.cpu(), z.cpu())
        result.info[name] = info

    try:
        with torch.no_grad():
            outside = by_block.get(None, [])
            if outside:  # embeddings, lm_head: round-to-nearest, before the blocks' inputs are captured
                for name in outside:
                    result[name] = minmax_qparams(modules[name].weight, plan.bits[name], plan.group_size)
                    result.info[name] = {"loss": 0.0, "damp": 0.0, "dead": 0, "rtn": True}
                fake_quantize_model(model, replace(plan, bits={k: plan.bits[k] for k in outside}))
            chunks = [batch[j : j + s.micro_batch] for j in range(0, batch.shape[0], s.micro_batch)]
            caps = [runner.capture(x) for x in chunks]
            hs, kws = [c[0] for c in caps], [c[1] for c in caps]
            del caps
            for i in progress(range(runner.n_blocks), desc="gptq", enable=show_progress):
                names = by_block.get(i, [])
                groups = []
                with runner.on_device(i) as block:
                    if names:
                        groups = (
                            sequential_groups(runner, block, names, modules, hs[0], kws[0])
                            if s.true_sequential
                            else [list(names)]
                        )
                        for group in groups:
                            dtype = modules[group[0]].weight.dtype
                            dtype = dtype if dtype == torch.float64 else torch.float32
                            for name, H in _hessians(runner, block, group, modules, hs, kws, dtype).items():
                                write(name, H)
                    result.groups.append(groups)
                    hs = [runner.run_block(block, h, kw) for h, kw in zip(hs, kws)]
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


@register_finalizer
class GPTQFinalizer(Rounder):
    """GPTQ's rounding (``config``: gptq_damp, gptq_act_order); the other settings are
    :class:`GPTQSettings`' defaults."""

    name = "gptq"

    def check(self, config, checkpoint=None) -> None:
        init = getattr(config, "init", "rtn")
        if init not in ("rtn", self.name):
            raise BitsearchError(f"gptq does not start from another rounding (init '{init}'; use rtn)")
        GPTQSettings(percdamp=getattr(config, "gptq_damp", 0.01))

    def round(self, model, plan, batch, config, show_progress=True) -> dict:
        if getattr(config, "method", self.name) == self.name:
            self.check(config)
        settings = GPTQSettings(
            percdamp=getattr(config, "gptq_damp", 0.01), act_order=getattr(config, "gptq_act_order", True)
        )
        return gptq_quantize(model, plan, batch, settings, show_progress=show_progress)
