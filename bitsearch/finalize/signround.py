"""SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", arXiv 2309.05516; Intel's AutoRound) under a bit plan's per-row widths.

Per target ``nn.Linear`` inside a decoder block, for each row at a width b in 2..8 (q_max =
2^b - 1) and each group of G input weights with lo = min(min(w), 0), hi = max(max(w), 0) as
in :mod:`bitsearch.quant.grid`, SignRound learns rounding offsets V (R, K) (init 0, or the
offsets V0 that reproduce a given start such as GPTQ's codes) and per-group clipping factors
a, c in [0.5, 1] (init 1):

    s = f16((c hi - a lo) / q_max),   z = clamp(round(-a lo / s), 0, q_max)
    q = clamp(round(w / s + V) + z, 0, q_max),      w_hat = (q - z) s

(f16 and both roundings with the straight-through estimator, ``fake_quant_rows``). With V = 0
and a = c = 1 this is the grid exactly, so zero steps give round-to-nearest bit for bit. Rows at
width 0 are 0 and rows at 16 the weight rounded to float16; neither is trained.

Block-wise reconstruction: blocks are tuned in order. The target of block i is the float
block's output on the float model's inputs to block i; the quantized block's input is the
output of the already quantized blocks 0..i-1 (AutoRound's default; ``float_inputs=True``
feeds the float inputs instead). Each step takes ``batch_size`` calibration samples (a seeded
shuffle consumed without replacement, reshuffled when fewer than a batch remain, as AutoRound's
sampler), the MSE between the quantized and target outputs, and moves every parameter by signed
gradient descent, p -= lr_t sign(dL/dp) with lr_t = lr (1 - t / steps) (linear decay to 0),
then clamps the factors to [0.5, 1] (V is not clamped, as in AutoRound: with the decaying lr it
moves by at most sum_t lr_t = lr (steps + 1) / 2, about 0.5 at the default). As AutoRound, the
parameters with the lowest mini-batch loss seen (measured before each update) are kept.
With ``guard`` (not in AutoRound) the block's whole-batch loss under them is compared with the
start's (round-to-nearest, or the given start) and the start is kept where it is lower.

Defaults follow AutoRound: 200 steps, batch 8, lr = 1 / steps (5e-3 at 200 steps, AutoRound's
default for both V and the min/max factors). AutoRound clamps the factors to [0, 1]; with the
decaying lr, [0.5, 1] binds only with a larger lr. Only one block's training state exists at a
time, the model's own weights are frozen, and with ``offload`` the blocks live on the CPU and
move to the device one at a time (:class:`~bitsearch.blocks.BlockRunner`).

Targets outside the decoder blocks (embeddings, a tied or untied lm_head) get plain
round-to-nearest. :func:`signround` writes each target's dequantized weight into the model in
place and returns per layer the (scales float16, zeros uint8) to pack it with: for a float32
model ``pack_weight(weight, bits, G, scales=..., zeros=...)`` then stores exactly the trained
codes (round(w_hat / s) + z = q, (q - z) s being exact in float32) and ``plan.n_bytes()``
bytes. Plans with coupled pruning are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..blocks import BlockRunner, names_by_block
from ..errors import BitsearchError
from ..io.plan import BitPlan
from ..progress import progress
from ..quant.grid import KEEP_WIDTH, QUANT_WIDTHS, choose_qparams, grouped, n_groups
from ..quantize import fake_quantize_model, plan_targets
from .base import Rounder, get_finalizer, register_finalizer, rounders
from .quantizer import fake_quant_rows
from .surrogates import round_ste, straight_through

__all__ = ["SignRoundSettings", "SignRoundResult", "signround", "minmax_qparams"]

_F16_MAX = torch.finfo(torch.float16).max
_START_MARGIN = 1e-3  # how far inside the start code's rounding interval V0 puts w / s
FACTOR_RANGE = (0.5, 1.0)  # clipping factors of the group min and max


@dataclass
class SignRoundSettings:
    """Options of :func:`signround` (defaults: AutoRound's)."""

    steps: int = 200  # signed-gradient steps per block (0 = round-to-nearest)
    lr: float | None = None  # initial step size for V and the factors; None = 1 / steps
    batch_size: int = 8  # calibration samples per step (all of them if fewer)
    seed: int = 0  # seeds the mini-batch sampler
    float_inputs: bool = False  # feed each block the float model's inputs, not the quantized ones
    guard: bool = True  # keep RTN for a block whose whole-batch loss it beats

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise BitsearchError(f"signround: steps must be an integer >= 0, not {self.steps}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise BitsearchError(f"signround: batch size must be an integer >= 1, not {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise BitsearchError(f"signround: lr must be a finite number > 0, not {self.lr}")

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else 1.0 / max(int(self.steps), 1)


class SignRoundResult(dict):
    """{layer name: (scales float16 (R, n_groups), zeros uint8 (R, n_groups))} on the CPU (rows
    not at a width 2..8 get 1 and 0), plus ``block_losses``: per decoder block a dict with the
    whole-batch MSE under the start (``rtn``: round-to-nearest or the given start) and under the
    kept parameters (``final``), the step of the kept parameters (``best_step``; -1 = the start)
    and ``targets``; and, with
    ``return_state``, ``state``: {layer: {"offsets" (R, K), "min_factor", "max_factor"
    (R, n_groups)}} (0 and 1 on rows not trained)."""

    def __init__(self):
        super().__init__()
        self.block_losses: list[dict] = []
        self.state: dict[str, dict[str, torch.Tensor]] = {}


def minmax_qparams(weight: torch.Tensor, bits, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's min-max (scales, zeros) for every row of ``weight`` at its width (1 / 0 on rows
    not at 2..8), on the CPU: what round-to-nearest packs with."""
    w = weight.detach().float().cpu()
    bits = torch.as_tensor(bits).to(torch.uint8).cpu()
    ng = n_groups(w.shape[1], group_size)
    scales = torch.ones(w.shape[0], ng, dtype=torch.float16)
    zeros = torch.zeros(w.shape[0], ng, dtype=torch.uint8)
    for b in QUANT_WIDTHS:
        rows = (bits == b).nonzero().flatten()
        if rows.numel():
            scales[rows], zeros[rows] = choose_qparams(w[rows], b, group_size)
    return scales, zeros


class _RowQuant:
    """The SignRound state of one Linear: offsets and clipping factors of its rows at 2..8."""

    def __init__(self, weight: torch.Tensor, bits, group_size: int, start: torch.Tensor | None = None):
        w = weight.detach().float()
        dev = w.device
        self.dtype, self.group_size, self.shape = weight.dtype, group_size, tuple(w.shape)
        self.bits = torch.as_tensor(bits).to(torch.uint8).to(dev)
        quant = (self.bits >= QUANT_WIDTHS[0]) & (self.bits <= QUANT_WIDTHS[-1])
        self.rows = quant.nonzero().flatten()
        keep = (self.bits == KEEP_WIDTH).unsqueeze(-1)
        self.base = torch.where(keep, w.half().float(), torch.zeros_like(w))  # pruned rows 0, kept rows f16
        self.w = w[self.rows]
        wg = grouped(self.w, group_size)
        self.lo = wg.amin(dim=-1).clamp(max=0)
        self.hi = wg.amax(dim=-1).clamp(min=0)
        self.qmax = 2.0 ** self.bits[self.rows].float() - 1
        rq, ng = self.lo.shape
        self.v0 = torch.zeros(rq, w.shape[1], device=dev)
        self.v = torch.zeros(rq, w.shape[1], device=dev, requires_grad=True)
        self.min_factor = torch.ones(rq, ng, device=dev, requires_grad=True)
        self.max_factor = torch.ones(rq, ng, device=dev, requires_grad=True)
        if start is not None and self.rows.numel():
            self.v0 = self._start_offsets(start.detach().float().to(dev)[self.rows])
            self.reset()

    @torch.no_grad()
    def _start_offsets(self, start: torch.Tensor) -> torch.Tensor:
        """The smallest offsets V0 with which the min-max grid rounds w to the codes of ``start``
        (a dequantized weight, e.g. GPTQ's): x = w / s moved just inside the rounding interval
        of the start code nearest to it (V0 = 0 where the codes agree), so that the signed steps
        can move back as easily as round-to-nearest's."""
        s, z = self.qparams()
        s = _grouped_like(torch.where(s > 0, s, torch.ones_like(s)), self.w.shape[1], self.group_size)
        z = _grouped_like(z, self.w.shape[1], self.group_size)
        qmax = self.qmax.unsqueeze(-1)
        code = torch.minimum((torch.round(start / s) + z).clamp(min=0), qmax)  # start's codes on this grid
        x = self.w / s
        margin = 0.5 - _START_MARGIN
        lo, hi = code - z - margin, code - z + margin
        lo = torch.where(code <= 0, torch.full_like(lo, -math.inf), lo)  # clamped codes: any x beyond
        hi = torch.where(code >= qmax, torch.full_like(hi, math.inf), hi)
        return torch.minimum(torch.maximum(x, lo), hi) - x

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.v, self.min_factor, self.max_factor] if self.rows.numel() else []

    def reset(self) -> None:
        """Back to the start: offsets V0 (0 = round-to-nearest), factors 1."""
        with torch.no_grad():
            self.v.copy_(self.v0)
            self.min_factor.fill_(1.0)
            self.max_factor.fill_(1.0)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) of the trained rows, float32 values exactly as stored, STE gradients."""
        lo = self.lo * self.min_factor
        hi = self.hi * self.max_factor
        raw = (hi - lo) / self.qmax.unsqueeze(-1)
        s = straight_through(raw, raw.detach().clamp(max=_F16_MAX).half().float())
        safe = torch.where(s.detach() > 0, s, torch.ones_like(s))
        z = torch.clamp(round_ste(-lo / safe), min=0)
        z = torch.minimum(z, self.qmax.unsqueeze(-1))
        return s, z

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight (R, K), float32, differentiable in V and the factors."""
        if not self.rows.numel():
            return self.base
        s, z = self.qparams()
        wq = fake_quant_rows(self.w, s, z, self.qmax, self.group_size, offsets=self.v)
        return self.base.index_copy(0, self.rows, wq)

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_hat (R, K) float32, scales float16, zeros uint8) under the current parameters."""
        w_hat = self.weight().detach()
        ng = n_groups(self.shape[1], self.group_size)
        scales = torch.ones(self.shape[0], ng, dtype=torch.float16, device=w_hat.device)
        zeros = torch.zeros(self.shape[0], ng, dtype=torch.uint8, device=w_hat.device)
        if self.rows.numel():
            s, z = self.qparams()
            scales[self.rows], zeros[self.rows] = s.half(), z.to(torch.uint8)
        return w_hat, scales, zeros

    @torch.no_grad()
    def state(self) -> dict[str, torch.Tensor]:
        ng = n_groups(self.shape[1], self.group_size)
        v = torch.zeros(self.shape, device=self.w.device)
        a, c = torch.ones(self.shape[0], ng, device=v.device), torch.ones(self.shape[0], ng, device=v.device)
        if self.rows.numel():
            v[self.rows], a[self.rows], c[self.rows] = self.v, self.min_factor, self.max_factor
        return {"offsets": v.cpu(), "min_factor": a.cpu(), "max_factor": c.cpu()}


def _run(block: nn.Module, h: torch.Tensor, kw: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    out = functional_call(block, weights, (h,), kw)
    return out[0] if isinstance(out, tuple) else out


def _grouped_like(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group values (R, n_groups) spread over the K columns (R, K)."""
    g = k if group_size == -1 or group_size >= k else group_size
    return t.repeat_interleave(g, dim=1)[:, :k]


def _sign_step(params: list[torch.Tensor], lr: float) -> None:
    """p -= lr sign(grad), then the factors to [0.5, 1] (V unbounded, as AutoRound's)."""
    with torch.no_grad():
        for k, p in enumerate(params):
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
            if k % 3:
                p.clamp_(*FACTOR_RANGE)
            p.grad = None


def signround(
    model: nn.Module,
    plan: BitPlan,
    batch: torch.Tensor,
    settings: SignRoundSettings | None = None,
    show_progress: bool = True,
    offload: bool = False,
    return_state: bool = False,
    start: dict[str, torch.Tensor] | None = None,
) -> SignRoundResult:
    """Quantize ``model`` under ``plan`` with SignRound on the calibration token ids ``batch``
    (N, T), in place (each target weight becomes its dequantized values); returns the scales
    and zeros to pack each target with (see :class:`SignRoundResult`). ``offload``: the decoder
    blocks are on the CPU and run on the device of the embeddings one at a time. ``start``
    {layer: dequantized weight} (e.g. GPTQ's; the model keeps its float weights): the rounding
    starts from these codes on the min-max grid instead of round-to-nearest (offsets V0, see
    ``_RowQuant._start_offsets``); the guard then compares with that start."""
    settings = settings or SignRoundSettings()
    if getattr(plan, "couplings", None):
        raise BitsearchError("signround: plans with coupled pruning are not supported yet")
    batch = torch.as_tensor(batch)
    if batch.dim() != 2 or batch.shape[0] == 0 or batch.shape[1] == 0:
        raise BitsearchError(f"signround: the calibration batch must be token ids (N, T), not {tuple(batch.shape)}")
    targets = plan_targets(model, plan, "signround", check_weights=False)
    runner = BlockRunner(model, offload=offload)
    modules = dict(model.named_modules())
    by_block = names_by_block(runner, [t.name for t in targets])
    n = batch.shape[0]
    bs = min(int(settings.batch_size), n)
    chunks = [batch[j : j + bs] for j in range(0, n, bs)]
    result = SignRoundResult()
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grad_flags:
        p.requires_grad_(False)
    try:
        caps = [runner.capture(x) for x in chunks]
        kws = [c[1] for c in caps]
        f_h = torch.cat([c[0] for c in caps])
        outside = by_block.get(None, [])
        if outside:  # embeddings, lm_head: round-to-nearest (before the quantized inputs are captured)
            for name in outside:
                result[name] = minmax_qparams(modules[name].weight, plan.bits[name], plan.group_size)
            fake_quantize_model(model, replace(plan, bits={k: plan.bits[k] for k in outside}))
        if settings.float_inputs:
            q_h = None
        elif outside:
            q_h = torch.cat([runner.capture(x)[0] for x in chunks])
        else:
            q_h = f_h
        sampler = _EpochSampler(n, bs, int(settings.seed))
        bar = progress(range(runner.n_blocks), desc="signround", enable=show_progress)
        for i in bar:
            names = by_block.get(i, [])
            with runner.on_device(i) as block:
                f_h, q_h, info = _tune_block(
                    block,
                    runner.prefix + f".{i}.",
                    names,
                    plan,
                    f_h,
                    q_h,
                    kws,
                    settings,
                    sampler,
                    result,
                    return_state,
                    modules,
                    start or {},
                )
            info["block"] = i
            result.block_losses.append(info)
            if hasattr(bar, "set_postfix_str") and names:
                bar.set_postfix_str(f"block {i}: MSE {info['rtn']:.4g} -> {info['final']:.4g}")
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return result


class _EpochSampler:
    """Mini-batches of ``bs`` sample indices drawn without replacement from a seeded shuffle,
    reshuffled when fewer than ``bs`` remain (AutoRound's order of sampling)."""

    def __init__(self, n: int, bs: int, seed: int):
        self.n, self.bs, self.pos = n, bs, n
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.arange(n)

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += self.bs
        return self.order[self.pos - self.bs : self.pos]


def _tune_block(
    block: nn.Module,
    prefix: str,
    names: list[str],
    plan: BitPlan,
    f_h: torch.Tensor,
    q_h: torch.Tensor | None,
    kws: list[dict],
    settings: SignRoundSettings,
    sampler: _EpochSampler,
    result: SignRoundResult,
    return_state: bool,
    modules: dict[str, nn.Module],
    start: dict[str, torch.Tensor],
):
    """Tune one block (on its device); returns (float outputs, quantized outputs or None, losses)."""
    dev = f_h.device
    n = f_h.shape[0]
    bs = min(int(settings.batch_size), n)
    spans = [(j, min(j + bs, n)) for j in range(0, n, bs)]

    @torch.no_grad()
    def run_all(h: torch.Tensor, weights: dict, target: torch.Tensor | None = None, keep: bool = True):
        outs, se = [], 0.0
        for (a, b), kw in zip(spans, kws):
            y = _run(block, h[a:b].to(dev), kw, weights)
            if target is not None:
                se += F.mse_loss(y.float(), target[a:b].to(y.device).float(), reduction="sum").item()
            if keep:
                outs.append(y)
        numel = target.numel() if target is not None else 1
        return (torch.cat(outs) if keep else None), se / numel

    f_out, _ = run_all(f_h, {})
    inp = f_h if q_h is None else q_h
    if not names:
        q_out = None if q_h is None else (f_out if q_h is f_h else run_all(q_h, {})[0])
        return f_out, q_out, {"targets": 0, "rtn": 0.0, "final": 0.0, "best_step": -1}
    states = {
        name: _RowQuant(modules[name].weight, plan.bits[name], plan.group_size, start.get(name)) for name in names
    }
    keys = {name: name[len(prefix) :] + ".weight" for name in names}

    def weights() -> dict[str, torch.Tensor]:
        # called before the `del states` below frees them
        return {keys[nm]: st.weight().to(st.dtype) for nm, st in states.items()}  # noqa: F821

    params = [p for st in states.values() for p in st.params]
    steps = int(settings.steps) if params else 0
    keep_rtn_out = steps == 0 and q_h is not None
    rtn_out, rtn_loss = run_all(inp, weights(), f_out, keep=keep_rtn_out)
    final_out, final_loss, best_step = rtn_out, rtn_loss, -1
    if steps:
        lr0 = settings.learning_rate
        best_loss, best = math.inf, None
        for step in range(steps):
            idx = sampler.next().to(inp.device)
            with torch.enable_grad():
                y = _run(block, inp[idx].to(dev), kws[0], weights())
                loss = F.mse_loss(y.float(), f_out[idx.to(f_out.device)].float())
                loss.backward()
            lv = loss.item()
            if lv < best_loss:
                best_loss, best, best_step = lv, [p.detach().clone() for p in params], step
            _sign_step(params, lr0 * (1.0 - step / steps))
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        final_out, final_loss = run_all(inp, weights(), f_out, keep=q_h is not None)
        if settings.guard and final_loss > rtn_loss:
            for st in states.values():
                st.reset()
            final_loss, best_step = rtn_loss, -1
            final_out = run_all(inp, weights(), keep=q_h is not None)[0]
    for name, st in states.items():
        w_hat, scales, zeros = st.final()
        with torch.no_grad():
            modules[name].weight.copy_(w_hat.to(modules[name].weight.dtype))
        result[name] = (scales.cpu(), zeros.cpu())
        if return_state:
            result.state[name] = st.state()
    del states, params
    info = {"targets": len(names), "rtn": rtn_loss, "final": final_loss, "best_step": best_step}
    return f_out, (final_out if q_h is not None else None), info


@register_finalizer
class SignRoundFinalizer(Rounder):
    """SignRound's learned rounding, block by block (``config``: signround_steps, signround_lr,
    batch_size, seed), from round-to-nearest or from another rounder's codes (``config.init``)."""

    name = "signround"

    def round(self, model, plan, batch, config, show_progress=True) -> dict:
        settings = SignRoundSettings(
            steps=config.signround_steps, lr=config.signround_lr, batch_size=config.batch_size, seed=config.seed
        )
        init = getattr(config, "init", None) or "rtn"
        start = None
        if init not in ("rtn", self.name):  # start from another rounder's codes
            first = get_finalizer(init)
            if not isinstance(first, Rounder):
                raise BitsearchError(
                    f"init '{init}' is not a rounding method (choose from rtn, {', '.join(rounders())})"
                )
            floats = {n: model.get_submodule(n).weight.detach().clone() for n in plan.bits}
            first.round(model, plan, batch, config, show_progress)
            start = {n: model.get_submodule(n).weight.detach().clone() for n in plan.bits}
            with torch.no_grad():
                for n, w in floats.items():
                    model.get_submodule(n).weight.copy_(w)
        return signround(model, plan, batch, settings, show_progress=show_progress, start=start)
