"""Differentiable bit widths with noise injection (```method` diffq``), pruning as a gate.

Each channel c of each target gets a continuous width b_c = b_lo + (b_hi - b_lo) * sigmoid(l_c)
(b_lo, b_hi: the smallest and largest quantizing widths of the menu) and, when 0 is in the menu,
a gate g_c = sigmoid(t_c). Training replaces every target weight by the pseudo-quantized

    w~_c = g_c * (w_c + Delta_c(b_c) * u),   u ~ U(-1/2, 1/2) per weight, fresh each step,
    Delta_cg(b) = range_cg / (2^b - 1)        (the grid's step for group g of row c at width b)

— the noise has the variance of rounding at width b, and its scale is differentiable in b.
The loss is distillation against the float model on calibration tokens plus a size penalty:

    L = KL(float || noisy) + rho * relu(S - B) / B,   S = sum_c g_c * (bits_c(b_c) + overhead_c) / 8 + bit map

(bits_c(b) = K_c * b, overhead_c = the row's scales and zeros). Only l and t are trained (Adam);
the model's weights stay frozen. Widths start at the greedy plan's (a warm start), gates open.

With ``relax="rtn"`` the noise is replaced by the real rounding error: between two adjacent
widths m_k <= b <= m_k+1 of the menu, w~_c = g_c * ((1 - a) q_mk(w_c) + a q_mk+1(w_c)) with
a = (b - m_k) / (m_k+1 - m_k) and q_m the round-to-nearest weight at width m (a FracBits-style
interpolation). At a menu width it is exactly the round-to-nearest weight that the candidates
are judged by, and the gradient in b is the first-order change of the loss from moving the
channel to the next width. It needs a (menu widths, out, in) stack of rounded weights per layer:
the held-out judge's (PlanKL) when there is one, shared, else its own. It is
the default (how its plans compare with the noise's and with greedy's, before and after a
finalizer: docs/search-methods.md).

With ``learn="layer"`` training moves whole layers instead of channels: each channel's logit is
its warm start's plus one trainable shift per layer, so a layer's channels keep the estimator's
ranking among themselves and only the split of the budget between layers is learned (one
parameter per layer instead of per channel: far fewer to fit from a few calibration samples).

Rounding, exactly within budget: the estimator's curves e_c(b) (the problem's errors), corrected
by how far training moved each channel from its warm start: e'_c(b) = e_c(b) * 4^(b*_c - b0_c)
(rounding noise power falls 4x per bit, so a channel training pushed up by d bits is treated as
4^d times more sensitive than the estimator said), with e'_c(0) = 0 for channels whose gate
closed (g_c < 1/2); the greedy allocator on these curves at the budget returns menu widths,
never over budget. At d = 0 this is exactly the greedy plan, which is also a candidate: with a
held-out batch, diffq returns the candidate (greedy or a rounding at some point of training)
with the lowest KL there, so it never does worse than greedy on that batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsearchError
from ..models import Target
from ..progress import progress
from ..quant.grid import QUANT_WIDTHS, grouped, n_groups
from .base import Allocator, register_allocator
from .greedy import GreedyAllocator
from .kl import PlanKL, rounded_stack
from .problem import AllocationProblem

__all__ = ["DiffqAllocator", "DiffqSettings", "group_ranges", "NoisyWidths", "diffq_allocate", "rounding_problem"]


@dataclass
class DiffqSettings:
    steps: int = 100
    lr: float = 0.05
    rho: float = 10.0
    seed: int = 0
    learn: str = "channel"  # "channel": a width per channel; "layer": a shift per layer (see top)
    relax: str = "rtn"  # "rtn": interpolated rounding; "noise": pseudo-quantization noise (see top)

    def __post_init__(self):
        if self.learn not in ("channel", "layer"):
            raise BitsearchError(f"diffq learns widths per 'channel' or per 'layer', not '{self.learn}'")
        if self.relax not in ("noise", "rtn"):
            raise BitsearchError(f"diffq relaxes widths by 'noise' or 'rtn', not '{self.relax}'")


def group_ranges(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, n_groups): max(max(x), 0) - min(min(x), 0) per group, as the grid uses."""
    g = grouped(weight.detach().float(), group_size)
    return g.amax(-1).clamp_min(0) - g.amin(-1).clamp_max(0)


class NoisyWidths(nn.Module):
    """The trainable widths and gates of every target, and the noisy weights they induce."""

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        group_size: int,
        menu: list[int],
        init_bits: dict[str, np.ndarray],
        learn: str = "channel",
        relax: str = "rtn",
        stacks: dict[str, torch.Tensor] | None = None,
    ):
        """``stacks``: round-to-nearest weights at every width of ``menu`` (sorted), e.g. a PlanKL's
        ``stack``, to share instead of building another copy (``relax="rtn"``)."""
        super().__init__()
        quant = [b for b in menu if b in QUANT_WIDTHS]
        if not quant:
            raise BitsearchError("diffq needs at least one quantizing width (2..8) in the menu")
        self.b_lo, self.b_hi = float(min(quant)), float(max(quant))
        self.prune = 0 in menu
        self.targets = targets
        self.group_size = group_size
        self.weights = {t.name: model.get_submodule(t.name).weight for t in targets}
        self.ranges = {t.name: group_ranges(self.weights[t.name], group_size) for t in targets}
        self.relax = relax
        if relax == "rtn":  # round-to-nearest weights at every quantizing width of the menu
            quant = sorted(quant)
            self.menu = torch.tensor(quant, dtype=torch.float64)
            if stacks is None:
                self.stacks = {n: rounded_stack(w.detach(), quant, group_size) for n, w in self.weights.items()}
            else:  # the quantizing widths are a run of the sorted menu (0 below, 16 above)
                if list(menu) != sorted(menu):
                    raise ValueError("NoisyWidths(stacks=...) needs the menu sorted, as the stacks are")
                first = list(menu).index(quant[0])
                self.stacks = {n: stacks[n][first : first + len(quant)] for n in self.weights}
        self.per_layer = learn == "layer"
        self.logits = nn.ParameterDict()
        self.shifts = nn.ParameterDict()
        self.gates = nn.ParameterDict()
        span = max(self.b_hi - self.b_lo, 1e-6)
        for t in targets:
            b0 = torch.as_tensor(init_bits[t.name], dtype=torch.float32).clamp(self.b_lo, self.b_hi)
            p = ((b0 - self.b_lo) / span).clamp(0.02, 0.98)
            key = self._key(t.name)
            logit = torch.log(p / (1 - p)).to(self.weights[t.name].device)
            self.logits[key] = nn.Parameter(logit, requires_grad=not self.per_layer)
            if self.per_layer:
                self.shifts[key] = nn.Parameter(torch.zeros((), device=logit.device))
            if self.prune:
                self.gates[key] = nn.Parameter(torch.full((t.out_features,), 4.0, device=self.weights[t.name].device))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def widths(self, name: str) -> torch.Tensor:
        k = self._key(name)
        logit = self.logits[k] + self.shifts[k] if self.per_layer else self.logits[k]
        return self.b_lo + (self.b_hi - self.b_lo) * torch.sigmoid(logit)

    def gate(self, name: str) -> torch.Tensor:
        k = self._key(name)
        return torch.sigmoid(self.gates[k]) if self.prune else torch.ones_like(self.logits[k])

    def noisy_weight(self, name: str, noise: torch.Tensor) -> torch.Tensor:
        """g * (w + Delta(b) * u) with ``noise`` = u of the weight's shape."""
        w = self.weights[name].detach()
        b = self.widths(name)
        delta = self.ranges[name] / (torch.pow(2.0, b)[:, None] - 1.0)  # (out, n_groups)
        k = w.shape[1]
        gsz = k if (self.group_size == -1 or self.group_size >= k) else self.group_size
        delta_w = delta.repeat_interleave(gsz, dim=1)[:, :k]
        return self.gate(name)[:, None] * (w.float() + delta_w * noise).to(w.dtype)

    def interpolated_weight(self, name: str) -> torch.Tensor:
        """g * ((1 - a) q_lo + a q_hi) between the menu widths around b (``relax="rtn"``)."""
        b = self.widths(name)
        stack = self.stacks[name]
        if stack.shape[0] == 1:
            return self.gate(name)[:, None] * stack[0]
        menu = self.menu.to(b.device, b.dtype)
        hi = torch.searchsorted(menu, b.detach()).clamp(1, len(menu) - 1)
        lo = hi - 1
        a = ((b - menu[lo]) / (menu[hi] - menu[lo])).clamp(0, 1)[:, None]
        rows = torch.arange(stack.shape[1], device=stack.device)
        w = (1 - a) * stack[lo, rows] + a * stack[hi, rows]
        return self.gate(name)[:, None] * w.to(stack.dtype)

    def relaxed_weight(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training forward's weight: noisy (fresh uniform noise) or interpolated."""
        if self.relax == "rtn":
            return self.interpolated_weight(name)
        w = self.weights[name]
        return self.noisy_weight(name, torch.rand(w.shape, generator=generator, device=w.device) - 0.5)

    def size_bytes(self, overhead: dict[str, float], bitmap: int) -> torch.Tensor:
        """Differentiable bytes: sum over channels of g * (K * b / 8 + overhead) + bit map."""
        total = torch.zeros((), device=next(iter(self.logits.values())).device)
        for t in self.targets:
            total = total + (self.gate(t.name) * (t.in_features * self.widths(t.name) / 8 + overhead[t.name])).sum()
        return total + bitmap


def rounding_problem(
    base: AllocationProblem, learned: dict[str, np.ndarray], closed: dict[str, np.ndarray], start: dict[str, np.ndarray]
) -> AllocationProblem:
    """The base problem's curves, each channel's times 4^(b* - b0) for the learned width b* and
    the warm-start width b0, pruning free where the gate closed (see top)."""
    errors = np.empty_like(base.errors)
    for name, s in base.layer_slices.items():
        e = base.errors[s] * np.power(4.0, np.clip(learned[name] - start[name], -60, 60))[:, None]
        if 0 in base.bits:
            e[closed[name], base.bits.index(0)] = 0.0
        errors[s] = e
    return AllocationProblem(
        bits=base.bits,
        errors=errors,
        costs=base.costs,
        fixed_bytes=base.fixed_bytes,
        n_weights=base.n_weights,
        layer_slices=base.layer_slices,
        group_size=base.group_size,
    )


def _learned(nw: "NoisyWidths", targets: list[Target]) -> tuple[dict, dict]:
    with torch.no_grad():
        learned = {t.name: nw.widths(t.name).cpu().numpy().astype(np.float64) for t in targets}
        closed = {t.name: (nw.gate(t.name) < 0.5).cpu().numpy() for t in targets}
    return learned, closed


def _round(
    nw: "NoisyWidths",
    problem: AllocationProblem,
    targets: list[Target],
    budget_bytes: int,
    start: dict[str, np.ndarray],
) -> np.ndarray:
    """The menu widths within the budget that the corrected curves (see top) prefer."""
    learned, closed = _learned(nw, targets)
    rp = rounding_problem(problem, learned, closed, start)
    return GreedyAllocator().allocate(rp, budget_bytes)


def diffq_allocate(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    problem: AllocationProblem,
    budget_bytes: int,
    settings: DiffqSettings,
    micro_batch: int = 8,
    show_progress: bool = True,
    validation: torch.Tensor | None = None,
    candidates: int = 4,
) -> tuple[np.ndarray, dict]:
    """Train widths and gates, round them onto the menu within the budget; returns (choice, info).

    With a ``validation`` batch (samples training never saw) the widths are rounded at
    ``candidates`` evenly spaced points of training (the last included) and, of those and the
    greedy warm start (step 0), the plan with the lowest KL on it is returned: a fixed step
    count either stops early or over-fits the training samples, and which one depends on the
    model and budget."""
    from torch.func import functional_call

    problem.check_budget(budget_bytes)
    greedy = GreedyAllocator()
    greedy_choice = greedy.allocate(problem, budget_bytes)
    start = problem.widths(greedy_choice)
    dev = next(model.parameters()).device
    gs = problem.group_size
    # the held-out judge's rounded weights are also the rtn relaxation's: one copy for both
    val = PlanKL(model, targets, validation, problem.bits, gs, micro_batch) if validation is not None else None
    nw = NoisyWidths(
        model,
        targets,
        gs,
        problem.bits,
        start,
        learn=settings.learn,
        relax=settings.relax,
        stacks=val.stack if val is not None else None,
    )
    start_learned = _learned(nw, targets)[0]  # the warm start as the sigmoid represents it
    overhead = {t.name: float(n_groups(t.in_features, gs) * 3) for t in targets}
    opt = torch.optim.Adam([p for p in nw.parameters() if p.requires_grad], lr=settings.lr)
    gen = torch.Generator(device=dev).manual_seed(settings.seed)  # noise drawn where the weights are
    flags = [(p, p.requires_grad) for p in model.parameters()]
    n_micro = (batch.shape[0] + micro_batch - 1) // micro_batch
    history = []
    marks = (
        {max(1, round(settings.steps * (k + 1) / candidates)) for k in range(candidates)}
        if validation is not None
        else {settings.steps}
    )
    rounded = {0: greedy_choice} if validation is not None else {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for step in progress(range(settings.steps), desc="diffq", enable=show_progress):
            j = step % n_micro
            x = batch[j * micro_batch : (j + 1) * micro_batch].to(dev)
            with torch.no_grad():
                ref = F.log_softmax(model(input_ids=x, use_cache=False).logits[:, :-1].float(), dim=-1)
            subs = {f"{t.name}.weight": nw.relaxed_weight(t.name, gen) for t in targets}
            lp = F.log_softmax(
                functional_call(model, subs, args=(), kwargs={"input_ids": x, "use_cache": False})
                .logits[:, :-1]
                .float(),
                dim=-1,
            )
            kl = (ref.exp() * (ref - lp)).sum(-1).mean()
            size = nw.size_bytes(overhead, problem.fixed_bytes)
            loss = kl + settings.rho * F.relu(size - budget_bytes) / budget_bytes
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append((float(kl.detach()), float(size.detach())))
            if step + 1 in marks:
                rounded[step + 1] = _round(nw, problem, targets, budget_bytes, start_learned)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    if not rounded:  # steps = 0: the rounded warm start
        rounded[0] = greedy_choice
    validated = {}
    if val is not None:
        validated = {k: val(problem.widths(c)) for k, c in rounded.items()}
        chosen = min(validated, key=validated.get)
    else:
        chosen = max(rounded)
    choice = rounded[chosen]
    learned, closed = _learned(nw, targets)
    info = {
        "steps": settings.steps,
        "learn": settings.learn,
        "relax": settings.relax,
        "chosen_step": chosen,
        "validation_kl_by_step": {str(k): v for k, v in validated.items()} or None,
        "final_kl": history[-1][0] if history else None,
        "final_size_bytes": history[-1][1] if history else None,
        "gates_closed": int(sum(int(c.sum()) for c in closed.values())),
        "mean_learned_bits": float(np.mean(np.concatenate(list(learned.values())))),
    }
    return choice, info


@register_allocator
class DiffqAllocator(Allocator):
    """Widths trained by distillation through a relaxation of the rounding (see the module docstring)."""

    name = "diffq"
    needs_model = True

    def __init__(self, settings: DiffqSettings | None = None):
        self.settings = settings or DiffqSettings()
        self.last_info: dict = {}

    @classmethod
    def from_config(cls, config) -> "DiffqAllocator":
        return cls(
            DiffqSettings(steps=config.steps, lr=config.lr, seed=config.seed, learn=config.learn, relax=config.relax)
        )

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        ctx = self.context
        choice, self.last_info = diffq_allocate(
            ctx.model,
            ctx.targets,
            ctx.batch,
            problem,
            budget_bytes,
            self.settings,
            ctx.micro_batch,
            ctx.show_progress,
            validation=ctx.validation,
        )
        return choice
