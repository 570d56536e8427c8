"""Differentiable surrogates for the two non-differentiable steps of fake quantization: rounding
and clamping (Sigmoid STE and SoftClamp, "Continuous Approximations for Improving Quantization
Aware Training of LLMs", arXiv 2410.10849).

Rounding. The paper's soft rounding with temperature T is, with f = x - floor(x),

    r_T(x) = floor(x) + sigmoid(T (f - 1/2)),         r_T'(x) = T sigmoid'(T (f - 1/2)).

Its derivative integrates to c_T = sigmoid(T/2) - sigmoid(-T/2) = tanh(T/4) over a unit
interval, so it vanishes as T -> 0, while T = 0 is meant to be the plain straight-through
estimator (gradient 1). We therefore use the derivative of the *rescaled* soft rounding

    s_T(x) = floor(x) + 1/2 + (sigmoid(T (f - 1/2)) - 1/2) / c_T
           = floor(x) + 1/2 + tanh(T (f - 1/2) / 2) / (2 tanh(T/4)),

    g_T(x) = s_T'(x) = r_T'(x) / c_T = (T / tanh(T/4)) sigmoid(u) sigmoid(-u),   u = T (f - 1/2),

which has mean 1 over every unit interval, tends to 1 (the STE) as T -> 0 and to a spike at
the half-integers as T grows; T = 0 is defined as the STE exactly. s_T is continuous (s_T(n) = n
at every integer n, where r_T jumps by 1 - c_T), equals x at T = 0 and tends to round(x) as
T -> infinity. T / tanh(T/4) is evaluated in double precision (finite for every T > 0, -> 4 as
T -> 0) and sigmoid(u) sigmoid(-u) underflows to 0 rather than overflowing for large T, so no
temperature yields NaN or inf.

The forward value is exact ``torch.round`` (ties to even, as :mod:`bitsearch.quant.grid`),
so what is trained is what is stored; ``soft_forward=True`` puts s_T itself in the forward
(a warm-up; for the STE, whose surrogate is the identity, the forward is then x unrounded).

Clamping. SoftClamp on [a, b] with g(z) = sigmoid(beta z) (beta = 1 in the paper) is

    S(x) = x g(x - a) g(b - x) + a g(a - x) + b g(x - b),

    S'(x) = g(x-a) g(b-x) + g'(x-a) (x g(b-x) - a) + g'(x-b) (b - x g(x-a)),
            g'(z) = beta sigmoid(beta z) sigmoid(-beta z).

S -> a far below a, -> b far above b and -> x inside [a, b] far from both edges (relative to
1/beta). Unlike the hard clamp its derivative is non-zero outside [a, b], so a step size s
reached through x = w / s keeps learning from clamped weights. ``clamp_codes(mode="soft")``
keeps the hard clamp's value in the forward and uses S' in the backward; with
``soft_forward=True`` the forward is S itself.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ROUND_MODES",
    "CLAMP_MODES",
    "straight_through",
    "soft_round",
    "soft_round_grad",
    "round_surrogate",
    "round_ste",
    "soft_clamp",
    "soft_clamp_grad",
    "clamp_codes",
]

ROUND_MODES = ("ste", "sigmoid")
CLAMP_MODES = ("hard", "soft")

Bound = torch.Tensor | float


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature {temperature} is not a finite number >= 0")
    return t


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not (b > 0 and math.isfinite(b)):
        raise ValueError(f"beta {beta} is not a finite number > 0")
    return b


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` exactly in the forward, the gradient passed to ``x`` unchanged (identity)."""
    return _StraightThrough.apply(x, value)


def soft_round(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The rescaled soft rounding s_T(x) (differentiable by autograd; s_0(x) = x)."""
    t = _check_temperature(temperature)
    if t == 0:
        return x
    fl = torch.floor(x).detach()
    return fl + 0.5 + torch.tanh((x - fl - 0.5) * (t / 2)) / (2 * math.tanh(t / 4))


def soft_round_grad(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """g_T(x) = s_T'(x), the normalised Sigmoid-STE derivative (1 everywhere at T = 0)."""
    t = _check_temperature(temperature)
    if t == 0:
        return torch.ones_like(x)
    u = (x - torch.floor(x) - 0.5) * t
    return (t / math.tanh(t / 4)) * torch.sigmoid(u) * torch.sigmoid(-u)


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, temperature: float, soft_forward: bool) -> torch.Tensor:
        ctx.temperature = temperature
        if temperature > 0:
            ctx.save_for_backward(x)
        if not soft_forward:
            return torch.round(x)
        return soft_round(x, temperature) if temperature > 0 else x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.temperature == 0:
            return grad, None, None
        (x,) = ctx.saved_tensors
        return grad * soft_round_grad(x, ctx.temperature), None, None


def round_surrogate(
    x: torch.Tensor, mode: str = "ste", temperature: float = 0.0, soft_forward: bool = False
) -> torch.Tensor:
    """``torch.round(x)`` with a surrogate gradient: ``ste`` (identity) or ``sigmoid`` (g_T;
    T = 0 is the STE). ``soft_forward`` returns the surrogate s_T(x) instead of round(x)."""
    if mode not in ROUND_MODES:
        raise ValueError(f"round mode '{mode}' is not one of {', '.join(ROUND_MODES)}")
    t = _check_temperature(temperature) if mode == "sigmoid" else 0.0
    return _Round.apply(x, t, bool(soft_forward))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` with the straight-through (identity) gradient."""
    return _Round.apply(x, 0.0, False)


def _g(z: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.sigmoid(beta * z)


def _dg(z: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * torch.sigmoid(beta * z) * torch.sigmoid(-beta * z)


def soft_clamp(x: torch.Tensor, lo: Bound, hi: Bound, beta: float = 1.0) -> torch.Tensor:
    """SoftClamp S(x; lo, hi) (differentiable by autograd, bounds included)."""
    beta = _check_beta(beta)
    return x * _g(x - lo, beta) * _g(hi - x, beta) + lo * _g(lo - x, beta) + hi * _g(x - hi, beta)


def soft_clamp_grad(x: torch.Tensor, lo: Bound, hi: Bound, beta: float = 1.0) -> torch.Tensor:
    """dS/dx of SoftClamp, in closed form."""
    beta = _check_beta(beta)
    g_lo, g_hi = _g(x - lo, beta), _g(hi - x, beta)
    return g_lo * g_hi + _dg(x - lo, beta) * (x * g_hi - lo) + _dg(x - hi, beta) * (hi - x * g_lo)


class _HardValueSoftGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        ctx.save_for_backward(x, lo, hi)
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, lo, hi = ctx.saved_tensors
        return grad * soft_clamp_grad(x, lo, hi, ctx.beta), None, None, None


def clamp_codes(
    x: torch.Tensor, lo: Bound, hi: Bound, mode: str = "hard", beta: float = 1.0, soft_forward: bool = False
) -> torch.Tensor:
    """Clamp ``x`` to [lo, hi] (bounds: numbers or tensors broadcastable to ``x``).

    ``hard``: ``torch.clamp``. ``soft``: the hard clamp's value with SoftClamp's gradient w.r.t.
    ``x`` (none to the bounds), or SoftClamp's value too with ``soft_forward=True``.
    """
    if mode not in CLAMP_MODES:
        raise ValueError(f"clamp mode '{mode}' is not one of {', '.join(CLAMP_MODES)}")
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    if mode == "hard":
        return torch.clamp(x, lo, hi)
    if soft_forward:
        return soft_clamp(x, lo, hi, beta)
    return _HardValueSoftGrad.apply(x, lo, hi, _check_beta(beta))
