"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) on bitsearch's grid and per-row widths: the peer baseline of
issue 7, and a finalizer of any bitsearch plan ("bitsearch plan + GPTQ rounding").

The algorithm is ``fasterquant`` of the reference repository (IST-DASLab/gptq, ``gptq.py``)
with AutoGPTQ's static groups:

* Hessian: H = 2 X X^T / n over the calibration tokens entering each target ``nn.Linear``
  (the scale of H does not change the result). Blocks are processed in order, each on the
  outputs of the already quantized blocks before it; inside a block, with ``true_sequential``
  (AutoGPTQ's default, the reference's ``--true-sequential``) the layers are quantized in groups
  of layers that read the same input (Llama: q/k/v, o, gate/up, down), each group's Hessians
  taken with the earlier groups already quantized. The groups are found structurally (which
  targets receive the very same input tensor in one forward), not from a per-architecture table.
* Dead inputs (H_ii = 0): H_ii = 1 and the column of W set to 0, as the reference does.
* Damping: H += percdamp * mean(diag H) * I (after the dead-input fix, as the reference). If
  the Cholesky factorisation still fails (the reference would stop there), the damping fraction
  becomes max(percdamp, 0.001) * 10^k for k = 1..4 until it succeeds (the damping used is in
  ``GPTQResult.info``).
* Act order (``act_order``, the reference's ``--act-order`` / AutoGPTQ's ``desc_act``): columns
  are processed by decreasing diag H.
* Static groups (``static_groups``, AutoGPTQ): the grid of every group of G *consecutive
  original* columns is chosen before the loop, on the (dead-zeroed) float weights, so with act
  order the groups are still contiguous in the stored column order. This is what makes act
  order storable in bitsearch's format (one fp16 scale and one uint8 zero per row and group of
  G consecutive columns; no g_idx). Without static groups (and without act order) each group's
  grid is chosen when the loop reaches its first column, on the weights updated by the error
  feedback so far (the reference's default; unlike the reference, which reads the stale
  pre-block values when a group starts inside a lazy block, the exact current values are
  used; with G = blocksize = 128, the reference's settings, both are the same).
  Act order without static groups is refused: its groups follow the permuted order, which
  needs a g_idx bitsearch does not store.
* Lazy batch updates (``blocksize`` columns at a time) and the upper Cholesky factor of H^-1.

The grid is bitsearch's (:mod:`bitsearch.quant.grid`): per row and group, lo = min(min(w), 0),
hi = max(max(w), 0), scale = f16((hi - lo) / (2^b - 1)), zero = clamp(round(-lo / scale)) as a
uint8, codes clamp(round(w / scale) + zero, 0, 2^b - 1); 0 is exactly representable. Every row
has its own width from a :class:`~bitsearch.io.plan.BitPlan` (its own q_max; rows of different
widths share H and are quantized in one pass), rows at width 0 become 0 and rows at 16 the
weight rounded to float16 (neither takes part in the error feedback). Targets outside the
decoder blocks (embeddings, a tied or untied lm_head) get round-to-nearest, before the blocks'
inputs are captured. Like SignRound (:mod:`bitsearch.finalize.signround`),
:func:`gptq_quantize` writes each target's dequantized weight into the model in place and
returns per layer the (scales float16, zeros uint8) to pack it with: for a float32 model
``pack_weight(weight, bits, G, scales, zeros)`` stores exactly GPTQ's codes and
``plan.n_bytes()`` bytes (``apply.pack_model(model, plan, qparams=result)``).

CLI (a uniform plan, every row at --bits, unless --plan is given)::

    python -m studies.reference.gptq --model ../shared/models/slm-llama-17m \\
        --calib ../shared/data/corpus/heldout.txt --bits 2 --group-size 128 --out runs/gptq_w2 \\
        --eval-text ../shared/data/corpus/wikitext2_test.txt --max-tokens 40000 --threads 1

Measured so (1 CPU thread, shared machine; 128 x 512 calibration tokens of heldout.txt; the
first 40,000 tokens of wikitext2_test, 512-token windows; the packed model evaluated):
W2 g128 2.2054 bits ppl 258.28 in 173 s, W3 g128 3.2054 bits ppl 224.21 in 172 s (float
223.73, round-to-nearest W2 298.32, W3 230.83 on the same tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from bitsearch.quantize import fake_quantize_model, plan_targets
from bitsearch.errors import BitsearchError
from bitsearch.finalize.signround import minmax_qparams
from bitsearch.io.plan import BitPlan
from bitsearch.progress import progress
from bitsearch.search.uniform import uniform_plan
from bitsearch.quant.grid import (KEEP_WIDTH, QUANT_WIDTHS, choose_qparams, dequantize, n_groups,
                                  quantize)
from bitsearch.blocks import names_by_block
from bitsearch.blocks import BlockRunner

__all__ = ["GPTQResult", "gptq_layer", "gptq_quantize", "uniform_plan", "sequential_groups"]

MAX_DAMP_RETRIES = 4


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------

def _row_qparams(w: torch.Tensor, bits: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's (scales f16, zeros u8) (R, n_groups) of rows ``w`` at their widths ``bits`` (R,)."""
    ng = n_groups(w.shape[1], group_size)
    scales = torch.empty(w.shape[0], ng, dtype=torch.float16, device=w.device)
    zeros = torch.empty(w.shape[0], ng, dtype=torch.uint8, device=w.device)
    for b in torch.unique(bits).tolist():
        rows = (bits == b).nonzero().flatten()
        scales[rows], zeros[rows] = choose_qparams(w[rows], int(b), group_size)
    return scales, zeros


def _fake_quant(w: torch.Tensor, s: torch.Tensor, s_safe: torch.Tensor, z: torch.Tensor,
                qmax: torch.Tensor) -> torch.Tensor:
    """(clamp(round(w / s) + z, 0, qmax) - z) * s with the grid's operations (all (R,) tensors)."""
    q = torch.minimum((torch.round(w / s_safe) + z).clamp_(min=0), qmax)
    return (q - z) * s


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1 with damp = percdamp * mean(diag H); on failure the
    fraction becomes max(percdamp, 0.001) * 10^attempt."""
    mean_diag = torch.mean(torch.diag(H)).item()
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        frac = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10 ** attempt
        damp = frac * mean_diag
        Hd = H.clone()
        Hd[idx, idx] += damp
        try:
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            if attempt == MAX_DAMP_RETRIES:
                raise BitsearchError(f"gptq: the Hessian is not positive definite even with damping {damp:.3g}") \
                    from None
    raise AssertionError("unreachable")


@torch.no_grad()
def gptq_layer(weight: torch.Tensor, H: torch.Tensor, bits, group_size: int, *, percdamp: float = 0.01,
               act_order: bool = True, static_groups: bool = True, blocksize: int = 128
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
        raise BitsearchError("gptq: act order needs static groups to be stored in bitsearch's format "
                             "(groups of consecutive columns)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    qmax = (2.0 ** bits.to(dtype) - 1)
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
        S = scales.to(dtype)[:, cols // G]              # (R, K), processing order
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
            elif j % G == 0:      # a new group: its grid on the current (error-updated) weights
                e = min(j + G, K)
                cur = W1[:, i:min(e, i2) - i1]
                if e > i2:        # the group reaches past the lazy block: add the pending update
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
def _quantize_rows(weight: torch.Tensor, H: torch.Tensor | None, bits: np.ndarray, group_size: int,
                   opts: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """A whole target at per-row widths: GPTQ on rows at 2..8 (RTN when ``H`` is None), 0 on rows
    at 0, float16 rounding on rows at 16. Returns (w_hat float32, scales, zeros, info)."""
    w = weight.detach().float()
    b = torch.as_tensor(bits).to(w.device).long()
    keep = (b == KEEP_WIDTH).unsqueeze(1)
    out = torch.where(keep, w.half().float(), torch.zeros_like(w))
    ng = n_groups(w.shape[1], group_size)
    scales = torch.ones(w.shape[0], ng, dtype=torch.float16, device=w.device)
    zeros = torch.zeros(w.shape[0], ng, dtype=torch.uint8, device=w.device)
    rows = ((b >= QUANT_WIDTHS[0]) & (b <= QUANT_WIDTHS[-1])).nonzero().flatten()
    info = {"loss": 0.0, "damp": 0.0, "dead": 0, "rtn": H is None}
    if rows.numel():
        if H is None:         # never called in the calibration forward: round-to-nearest
            s, z = _row_qparams(w[rows], b[rows], group_size)
            q = torch.empty_like(w[rows])
            for width in torch.unique(b[rows]).tolist():
                sub = (b[rows] == width).nonzero().flatten()
                q[sub] = dequantize(quantize(w[rows][sub], s[sub], z[sub], width, group_size), s[sub], z[sub],
                                    group_size)
        else:
            q, s, z, i = gptq_layer(w[rows], H, b[rows], group_size, **opts)
            info.update(i)
        out[rows], scales[rows], zeros[rows] = q.float(), s, z
    return out, scales, zeros, info


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------

class GPTQResult(dict):
    """{layer name: (scales float16 (R, n_groups), zeros uint8 (R, n_groups))} on the CPU (1 and
    0 on rows not at a width 2..8), plus per layer ``info`` {"loss", "damp", "dead", "rtn"},
    ``groups`` (per decoder block, the layer groups quantized in turn) and ``seconds``."""

    def __init__(self):
        super().__init__()
        self.info: dict[str, dict] = {}
        self.groups: list[list[list[str]]] = []
        self.seconds = 0.0


class _Stop(Exception):
    pass


def _input_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@torch.no_grad()
def sequential_groups(runner: BlockRunner, block: nn.Module, names: list[str], modules: dict,
                      h: torch.Tensor, kw: dict) -> list[list[str]]:
    """The targets ``names`` of ``block`` in groups of layers reading the same input tensor, in the
    order of the forward pass (one forward of ``block`` on ``h``)."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [modules[n].register_forward_pre_hook(
        (lambda n: lambda _m, args, kwargs: calls.append((n, _input_of(args, kwargs))))(n), with_kwargs=True)
        for n in names]
    try:
        runner.run_block(block, h, kw)
    finally:
        for hk in hooks:
            hk.remove()

    def key(t: torch.Tensor):
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)

    groups, seen = [], set()
    for n, t in calls:         # the tensors stay alive in ``calls``: equal keys mean the same input
        if n in seen:
            continue
        g = [m for m, u in calls if m not in seen and key(u) == key(t)]
        g = list(dict.fromkeys(g))
        seen.update(g)
        groups.append(g)
    never = [n for n in names if n not in seen]
    if never:
        groups.append(never)   # never called: no inputs (round-to-nearest below)
    return groups


@torch.no_grad()
def _hessians(runner: BlockRunner, block: nn.Module, group: list[str], modules: dict, hs: list[torch.Tensor],
              kws: list[dict]) -> dict[str, torch.Tensor | None]:
    """H = 2 X X^T / n of every layer of ``group`` over the micro-batches ``hs`` (the block's forward
    stops once every layer of the group has read its input)."""
    H = {n: None for n in group}
    count = {n: 0 for n in group}
    seen: set[str] = set()

    def make(n):
        def hook(_m, args, kwargs):
            x = _input_of(args, kwargs).detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if H[n] is None:
                H[n] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            H[n].addmm_(x.t(), x)
            count[n] += x.shape[0]
            seen.add(n)
            if len(seen) == len(group):
                raise _Stop
        return hook

    hooks = [modules[n].register_forward_pre_hook(make(n), with_kwargs=True) for n in group]
    try:
        for h, kw in zip(hs, kws):
            seen.clear()
            try:
                runner.run_block(block, h, kw)
            except _Stop:
                pass
    finally:
        for hk in hooks:
            hk.remove()
    return {n: (H[n] * (2.0 / count[n]) if H[n] is not None else None) for n in group}


def gptq_quantize(model: nn.Module, plan: BitPlan, batch: torch.Tensor, *, percdamp: float = 0.01,
                  act_order: bool = True, static_groups: bool = True, blocksize: int = 128, micro_batch: int = 8,
                  true_sequential: bool = True, offload: bool = False, show_progress: bool = True) -> GPTQResult:
    """Quantize ``model`` under ``plan`` with GPTQ on the calibration token ids ``batch`` (N, T), in
    place (each target weight becomes its dequantized values); returns the scales and zeros to
    pack each target with (see :class:`GPTQResult`). ``offload``: the decoder blocks are on the
    CPU and run on the device of the embeddings one at a time."""
    t0 = time.perf_counter()
    if getattr(plan, "couplings", None):
        raise BitsearchError("gptq: plans with coupled pruning are not supported")
    batch = torch.as_tensor(batch)
    if batch.dim() != 2 or batch.shape[0] == 0 or batch.shape[1] == 0:
        raise BitsearchError(f"gptq: the calibration batch must be token ids (N, T), not {tuple(batch.shape)}")
    if not 0 <= percdamp < math.inf or micro_batch < 1 or blocksize < 1:
        raise BitsearchError("gptq: percdamp must be >= 0, micro_batch and blocksize >= 1")
    if act_order and not static_groups and plan.group_size != -1 \
            and any(n_groups(i, plan.group_size) > 1 for _, i in plan.shapes.values()):
        raise BitsearchError("gptq: act order needs static groups to be stored in bitsearch's format")
    opts = dict(percdamp=percdamp, act_order=act_order, static_groups=static_groups, blocksize=blocksize)
    targets = plan_targets(model, plan, "gptq", check_weights=False)
    runner = BlockRunner(model, offload=offload)
    modules = dict(model.named_modules())
    by_block = names_by_block(runner, [t.name for t in targets])
    result = GPTQResult()
    was_training = model.training
    model.eval()

    def write(name: str, H: torch.Tensor | None) -> None:
        weight = modules[name].weight
        w_hat, s, z, info = _quantize_rows(weight, H, plan.bits[name], plan.group_size, opts)
        weight.data.copy_(w_hat.to(weight.dtype))
        result[name] = (s.cpu(), z.cpu())
        result.info[name] = info

    try:
        with torch.no_grad():
            outside = by_block.get(None, [])
            if outside:   # embeddings, lm_head: round-to-nearest, before the blocks' inputs are captured
                for name in outside:
                    result[name] = minmax_qparams(modules[name].weight, plan.bits[name], plan.group_size)
                    result.info[name] = {"loss": 0.0, "damp": 0.0, "dead": 0, "rtn": True}
                fake_quantize_model(model, replace(plan, bits={k: plan.bits[k] for k in outside}))
            chunks = [batch[j:j + micro_batch] for j in range(0, batch.shape[0], micro_batch)]
            caps = [runner.capture(x) for x in chunks]
            hs, kws = [c[0] for c in caps], [c[1] for c in caps]
            del caps
            for i in progress(range(runner.n_blocks), desc="gptq", enable=show_progress):
                names = by_block.get(i, [])
                with runner.on_device(i) as block:
                    if names:
                        groups = sequential_groups(runner, block, names, modules, hs[0], kws[0]) \
                            if true_sequential else [list(names)]
                        result.groups.append(groups)
                        for group in groups:
                            for name, H in _hessians(runner, block, group, modules, hs, kws).items():
                                write(name, H)
                    else:
                        result.groups.append([])
                    hs = [runner.run_block(block, h, kw) for h, kw in zip(hs, kws)]
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    from bitsearch import api
    from bitsearch.quantize import pack_model
    from bitsearch.io.checkpoint import save_packed
    from bitsearch.config import EvalConfig
    from bitsearch.data import calibration_batches
    from bitsearch.io.loading import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text file")
    ap.add_argument("--bits", type=int, choices=list(QUANT_WIDTHS), help="uniform width (without --plan)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--plan", help="a bitsearch plan to finalize with GPTQ instead of a uniform one")
    ap.add_argument("--out", required=True, help="packed checkpoint folder")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--no-static-groups", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-text")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.plan is None) == (args.bits is None):
        ap.error("give exactly one of --bits and --plan")
    model = load_model(args.model, args.device)
    tok = load_tokenizer(args.model)
    if args.plan:
        plan = BitPlan.load(args.plan)
        if not plan.summary:
            plan.fill_summary()
    else:
        plan = uniform_plan(model, args.bits, args.group_size)
    batch, spec = calibration_batches(tok, args.calib, args.samples, args.seq_len, args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = gptq_quantize(model, plan, batch, percdamp=args.percdamp, act_order=not args.no_act_order,
                        static_groups=not args.no_static_groups, blocksize=args.blocksize,
                        micro_batch=args.micro_batch, true_sequential=not args.no_true_sequential)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    settings = (f"gptq percdamp={args.percdamp} act_order={not args.no_act_order} "
                f"static_groups={not args.no_static_groups} true_sequential={not args.no_true_sequential}")
    plan.provenance = dict(plan.provenance, finalizer=settings,
                           calibration=f"{args.calib} {args.samples}x{args.seq_len} seed {args.seed}")
    pack_model(model, plan, qparams=res)
    n_bytes = save_packed(model, plan, args.out, tok)
    summary = {"model": args.model, "plan": args.plan or f"uniform W{args.bits} g{args.group_size}", "gptq": settings,
               "avg_bits": plan.summary["avg_bits"], "bytes": n_bytes, "plan_bytes": plan.n_bytes(),
               "quantize_seconds": round(seconds, 2), "threads": torch.get_num_threads(), "device": args.device,
               "calibration": f"{args.samples}x{args.seq_len}", "out": args.out}
    print(f"gptq: quantized in {seconds:.1f} s; avg bits {plan.summary['avg_bits']:.4f} ({n_bytes} bytes); "
          f"packed checkpoint in {args.out}", flush=True)
    if args.eval_text:
        r = api.evaluate(model, args.eval_text, EvalConfig(max_tokens=args.max_tokens, seq_len=args.eval_seq_len,
                                                          device=args.device, show_progress=False), tokenizer=tok)
        summary.update(ppl=r.ppl, eval_tokens=r.tokens, eval_text=args.eval_text)
        print(f"gptq: perplexity {r.ppl:.2f} on {r.tokens} tokens of {args.eval_text}", flush=True)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
