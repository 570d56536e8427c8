"""Rounding and clamping surrogates of QAT: Sigmoid STE against finite differences, SoftClamp's
limits and gradients."""

import math

import pytest
import torch

from bitsearch.finalize.surrogates import (
    clamp_codes,
    round_ste,
    round_surrogate,
    soft_clamp,
    soft_clamp_grad,
    soft_round,
    soft_round_grad,
    straight_through,
)


def paper_soft_round(x: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's r_T(x) = floor(x) + sigmoid(T (x - floor(x) - 1/2))."""
    fl = torch.floor(x)
    return fl + torch.sigmoid(t * (x - fl - 0.5))


def away_from_integers(n: int, seed: int, margin: float = 0.05) -> torch.Tensor:
    """Random points in [-6, 6] whose fractional part lies in [margin, 1 - margin] (r_T jumps at
    the integers; the half-integers, where g_T peaks, are included)."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randint(-6, 6, (n,), generator=g).double()
    frac = margin + (1 - 2 * margin) * torch.rand(n, generator=g, dtype=torch.float64)
    return whole + frac


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


@pytest.mark.parametrize("t", [1.0, 5.0, 20.0, 100.0])
def test_sigmoid_ste_gradient_is_normalised_derivative_of_paper_soft_round(t):
    x = torch.cat([away_from_integers(400, seed=int(t)), torch.arange(-5, 5, dtype=torch.float64) + 0.5])
    h = 1e-6
    fd = (paper_soft_round(x + h, t) - paper_soft_round(x - h, t)) / (2 * h)
    half = torch.tensor(t / 2, dtype=torch.float64)
    expect = fd / (torch.sigmoid(half) - torch.sigmoid(-half))  # the normalisation 1 / c_T
    got = grad_of(lambda v: round_surrogate(v, "sigmoid", t), x)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-8 * t)
    # float32 agrees too, and the rescaled soft rounding's autograd derivative is the same g_T
    got32 = grad_of(lambda v: round_surrogate(v, "sigmoid", t), x.float())
    torch.testing.assert_close(got32.double(), expect, rtol=1e-4, atol=1e-5 * t)
    torch.testing.assert_close(grad_of(lambda v: soft_round(v, t), x), expect, rtol=1e-6, atol=1e-8 * t)
    torch.testing.assert_close(soft_round_grad(x, t), expect, rtol=1e-6, atol=1e-8 * t)


@pytest.mark.parametrize("t", [1.0, 5.0, 20.0])
def test_normalised_gradient_has_mean_one_per_unit_interval(t):
    x = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000 + 3.0  # midpoints of [3, 4]
    assert soft_round_grad(x, t).mean().item() == pytest.approx(1.0, rel=1e-6)


def test_temperature_zero_and_ste_give_gradient_exactly_one():
    x = torch.randn(1000, dtype=torch.float32) * 4
    ones = torch.ones_like(x)
    assert torch.equal(grad_of(lambda v: round_surrogate(v, "sigmoid", 0.0), x), ones)
    assert torch.equal(grad_of(lambda v: round_surrogate(v, "ste", 50.0), x), ones)  # ste ignores T
    assert torch.equal(grad_of(round_ste, x), ones)


@pytest.mark.parametrize("t", [1e-30, 1e-6, 1e-3])
def test_small_temperature_tends_to_ste(t):
    x = torch.randn(1000) * 4
    torch.testing.assert_close(
        grad_of(lambda v: round_surrogate(v, "sigmoid", t), x), torch.ones_like(x), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("t", [1000.0, 1e6])
def test_large_temperature_is_finite(t):
    x = torch.cat([torch.arange(-8, 8, 0.25), torch.tensor([1e6, -1e6, 0.5 + 1e-7]), torch.randn(1000) * 100])
    g = grad_of(lambda v: round_surrogate(v, "sigmoid", t), x)
    assert torch.isfinite(g).all() and (g >= 0).all()
    assert g[:64][torch.arange(-8, 8, 0.25) % 1 == 0.5].min() == pytest.approx(t / 4 / math.tanh(t / 4))
    s = grad_of(lambda v: round_surrogate(v, "sigmoid", t, soft_forward=True), x)
    assert torch.isfinite(s).all()
    assert torch.isfinite(soft_round(x, t)).all()


def test_forward_is_exact_round_unless_soft():
    x = torch.cat([torch.arange(-4, 4, 0.5), torch.randn(500) * 10])
    for mode, t in (("ste", 0.0), ("sigmoid", 0.0), ("sigmoid", 5.0), ("sigmoid", 1000.0)):
        assert torch.equal(round_surrogate(x, mode, t), torch.round(x))  # ties to even, as the grid
    # the soft forward is the rescaled soft rounding: x at T = 0, continuous, n at integers, -> round
    assert torch.equal(round_surrogate(x, "sigmoid", 0.0, soft_forward=True), x)
    assert torch.equal(round_surrogate(x, "sigmoid", 5.0, soft_forward=True), soft_round(x, 5.0))
    n = torch.arange(-5, 6, dtype=torch.float64)
    for t in (1.0, 5.0, 20.0):
        torch.testing.assert_close(soft_round(n - 1e-9, t), n, atol=1e-7, rtol=0)
        torch.testing.assert_close(soft_round(n + 1e-9, t), n, atol=1e-7, rtol=0)
    y = torch.randn(500, dtype=torch.float64) * 5
    y = y[(y - torch.floor(y) - 0.5).abs() > 0.05]
    torch.testing.assert_close(soft_round(y, 1000.0), torch.round(y))


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="round mode"):
        round_surrogate(x, "nearest")
    with pytest.raises(ValueError, match="temperature"):
        round_surrogate(x, "sigmoid", -1.0)
    with pytest.raises(ValueError, match="clamp mode"):
        clamp_codes(x, 0, 3, "tanh")
    with pytest.raises(ValueError, match="beta"):
        clamp_codes(x, 0, 3, "soft", beta=0.0)


def test_straight_through_value_and_gradient():
    x = torch.randn(50, requires_grad=True)
    v = x.detach().half().float()
    y = straight_through(x, v)
    assert torch.equal(y, v)
    (y * torch.arange(50.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(50.0))


def test_soft_clamp_limits():
    a, b = 0.0, 3.0
    assert soft_clamp(torch.tensor(-40.0), a, b).item() == pytest.approx(a, abs=1e-12)
    assert soft_clamp(torch.tensor(40.0), a, b).item() == pytest.approx(b, abs=1e-12)
    x = torch.linspace(0.2, 2.8, 27, dtype=torch.float64)
    torch.testing.assert_close(soft_clamp(x, a, b, beta=200.0), x, rtol=0, atol=1e-12)  # large beta
    y = torch.linspace(40, 60, 21, dtype=torch.float64)
    torch.testing.assert_close(soft_clamp(y, 0.0, 100.0), y, rtol=0, atol=1e-12)  # far from the edges
    far = torch.tensor([-1e4, 1e4, -1e30, 1e30])
    torch.testing.assert_close(soft_clamp(far, a, b), torch.tensor([a, b, a, b]))
    assert torch.isfinite(soft_clamp_grad(far, a, b)).all()


def test_soft_clamp_grad_matches_autograd_with_tensor_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 40, generator=g, dtype=torch.float64) * 8 + 4
    lo = torch.zeros(6, 1, 1, dtype=torch.float64)
    hi = torch.tensor([3.0, 7, 15, 31, 63, 255], dtype=torch.float64).reshape(6, 1, 1)
    for beta in (0.5, 1.0, 4.0):
        expect = grad_of(lambda v: soft_clamp(v, lo, hi, beta), x)
        torch.testing.assert_close(soft_clamp_grad(x, lo, hi, beta), expect, rtol=1e-10, atol=1e-12)
        got = grad_of(lambda v: clamp_codes(v, lo, hi, "soft", beta), x)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
        assert torch.equal(clamp_codes(x, lo, hi, "soft", beta), torch.clamp(x, lo, hi))  # hard value forward
        assert torch.equal(clamp_codes(x, lo, hi, "soft", beta, soft_forward=True), soft_clamp(x, lo, hi, beta))
    assert torch.equal(clamp_codes(x, lo, hi, "hard"), torch.clamp(x, lo, hi))
    assert torch.equal(clamp_codes(x, 0, 3), x.clamp(0, 3))


def test_soft_clamp_gives_step_size_a_gradient_where_hard_clamp_does_not():
    w = torch.tensor([-2.0, -0.6, 3.5, 4.0, 10.0, 1.0, 2.0])  # x = w / s with s = 1; [a, b] = [0, 3]
    outside = (w < 0) | (w > 3)

    def step_grad(mode: str) -> torch.Tensor:
        s = torch.ones_like(w, requires_grad=True)
        clamp_codes(w / s, 0.0, 3.0, mode).sum().backward()
        return s.grad

    hard, soft = step_grad("hard"), step_grad("soft")
    assert (hard[outside] == 0).all() and (hard[~outside] != 0).all()
    assert (soft != 0).all()
    torch.testing.assert_close(soft, soft_clamp_grad(w, 0.0, 3.0) * -w)  # dx/ds = -w / s^2
