"""Fake quantization for QAT under a bit plan: the grid of :mod:`bitsearch.quant.grid` with
trainable weights, step sizes and zero points, and the conversion to packed layers.

Per group of G input weights of a row at width b (q_max = 2^b - 1), with step size s, zero
point z and optional rounding offsets v (SignRound):

    q = clamp(round(w / s + v) + round(z), 0, q_max),      w_hat = (q - round(z)) * s

exactly :func:`~bitsearch.quant.grid.quantize` / ``dequantize`` (a group whose scale is 0 is
divided by 1, as there), so with the grid's min-max (s, z) and no training the result equals
``grid.fake_quantize`` bit for bit. Only the backward differs: round(w / s + v) uses the
surrogate of :mod:`.surrogates` (STE or Sigmoid STE), the clamp the hard or SoftClamp gradient,
round(z) the STE.

:class:`QuantLinear` trains one ``nn.Linear`` under per-row widths: a float32 master copy of the
weight and per-group ``scale`` / ``zero`` (LSQ-style, initialised by ``grid.choose_qparams``).
In the forward the scale is clamped to the float16 range [2^-24, 65504] and rounded to float16,
the zero point rounded and clamped to [0, q_max], both with identity gradients, so the forward
computes exactly what :meth:`QuantLinear.to_packed` stores: after training, :func:`convert`
gives a :class:`~bitsearch.packed.PackedLinear` with the same outputs and exactly the plan's
bytes. Rows at width 0 give 0 (plus the bias) and get no gradient; rows at 16 are the weight
rounded to float16 (STE). All widths of a layer are computed at once (q_max per row).

``soft_forward`` (surrogate values in the forward) is for warm-up only: the converted model
matches the QAT forward when it is off.

:meth:`QuantLinear.freeze_codes` fixes the integer codes (and zero points) at their current
values and leaves only the step sizes to train, w_hat = (q - z) * s with q and z constant:
EfficientQAT's end-to-end training of quantization parameters. Its step sizes get the exact
gradient (q - z) where the straight-through one, (round(w / s) - w / s), vanishes on weights that
already lie on the grid, as they do after SignRound or GPTQ.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsearchError
from ..io.plan import BitPlan
from ..packed import PackedEmbedding, PackedLinear, pack_weight
from ..quant.grid import (
    KEEP_WIDTH,
    PRUNE_WIDTH,
    QUANT_WIDTHS,
    VALID_WIDTHS,
    choose_qparams,
    grouped,
    n_groups,
    ungrouped,
)
from ..quantize import pack_model, plan_targets
from .surrogates import CLAMP_MODES, ROUND_MODES, clamp_codes, round_ste, round_surrogate, straight_through

__all__ = ["fake_quant_rows", "QuantLinear", "prepare", "convert"]

_F16_TINY = 2.0**-24  # smallest positive float16 (subnormal)
_F16_MAX = torch.finfo(torch.float16).max


def fake_quant_rows(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: torch.Tensor | int,
    group_size: int,
    round_mode: str = "ste",
    temperature: float = 0.0,
    clamp_mode: str = "hard",
    beta: float = 1.0,
    offsets: torch.Tensor | None = None,
    soft_forward: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize rows ``w`` (R, K) with per-group ``scale`` / ``zero`` (R, n_groups)
    and per-row ``qmax`` (R,) (or one int), differentiably; ``offsets`` (R, K) are added to
    w / s before rounding. The partial last group is padded as the grid pads it."""
    rows, k = w.shape
    ng = n_groups(k, group_size)
    if scale.shape != (rows, ng) or zero.shape != (rows, ng):
        raise ValueError(
            f"fake_quant_rows: scale {tuple(scale.shape)} / zero {tuple(zero.shape)} are not ({rows}, {ng})"
        )
    wg = grouped(w.float(), group_size)
    s = scale.float().unsqueeze(-1)
    x = wg / torch.where(s > 0, s, torch.ones_like(s))
    if offsets is not None:
        x = x + grouped(offsets.float(), group_size)
    z = round_ste(zero.float()).unsqueeze(-1)
    hi = torch.as_tensor(qmax, dtype=x.dtype, device=x.device)
    if hi.dim():
        hi = hi.reshape(rows, 1, 1)
    q = clamp_codes(
        round_surrogate(x, round_mode, temperature, soft_forward) + z, 0.0, hi, clamp_mode, beta, soft_forward
    )
    return ungrouped((q - z) * s, k).to(w.dtype)


class QuantLinear(nn.Module):
    """An ``nn.Linear`` fake-quantized under per-row widths ``bits`` (out,) in {0, 2..8, 16},
    with a trainable ``weight`` (float32) and per-group ``scale`` / ``zero`` (out, n_groups).

    The options are plain attributes, so a training loop may change them between steps (e.g.
    anneal ``temperature``): ``round_mode`` "ste" | "sigmoid", ``temperature`` (Sigmoid STE;
    0 = STE), ``clamp_mode`` "hard" | "soft", ``beta`` (SoftClamp), ``soft_forward``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: torch.Tensor,
        group_size: int,
        *,
        round_mode: str = "ste",
        temperature: float = 0.0,
        clamp_mode: str = "hard",
        beta: float = 1.0,
        soft_forward: bool = False,
        learn_scale: bool = True,
        learn_zero: bool = True,
        learn_weight: bool = True,
    ):
        super().__init__()
        if round_mode not in ROUND_MODES or clamp_mode not in CLAMP_MODES:
            raise ValueError(
                f"QuantLinear: round mode '{round_mode}' / clamp mode '{clamp_mode}' unknown "
                f"(choose from {ROUND_MODES} / {CLAMP_MODES})"
            )
        out_f, in_f = linear.weight.shape
        bits = torch.as_tensor(bits).to(torch.uint8).flatten()
        if bits.numel() != out_f:
            raise ValueError(f"QuantLinear: {bits.numel()} widths for {out_f} rows")
        bad = sorted(set(bits.tolist()) - set(VALID_WIDTHS))
        if bad:
            raise ValueError(f"QuantLinear: width {bad[0]} is not one of {list(VALID_WIDTHS)}")
        dev = linear.weight.device
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.compute_dtype = linear.weight.dtype
        self.round_mode, self.temperature, self.soft_forward = round_mode, float(temperature), soft_forward
        self.clamp_mode, self.beta = clamp_mode, float(beta)

        w = linear.weight.detach().float().clone()
        ng = n_groups(in_f, group_size)
        scale = torch.ones(out_f, ng, device=dev)
        zero = torch.zeros(out_f, ng, device=dev)
        qmax = torch.full((out_f,), 255.0, device=dev)
        bits = bits.to(dev)
        for b in QUANT_WIDTHS:
            rows = (bits == b).nonzero().flatten()
            if rows.numel():
                s, z = choose_qparams(w[rows], b, group_size)
                scale[rows], zero[rows], qmax[rows] = s.float(), z.float(), float(2**b - 1)
        self.register_buffer("bits", bits)
        self.register_buffer("qmax", qmax)
        self.weight = nn.Parameter(w, requires_grad=learn_weight)
        self.scale = nn.Parameter(scale, requires_grad=learn_scale)
        self.zero = nn.Parameter(zero, requires_grad=learn_zero)
        bias = linear.bias
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("codes", None)  # (out, n_groups, G) uint8 once frozen

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix the codes the forward computes now (and the zero points); from here on only the
        step sizes train, and the weight is (codes - zero) * scale."""
        s = self._effective_scale().unsqueeze(-1)
        x = grouped(self.weight.float(), self.group_size) / torch.where(s > 0, s, torch.ones_like(s))
        z = self._effective_zero().unsqueeze(-1)
        q = (torch.round(x) + z).clamp(min=0).minimum(self.qmax.reshape(-1, 1, 1))
        self.codes = q.to(torch.uint8)
        # from here on the weight serves only the rows kept in float16, which the forward rounds
        # to float16 anyway: kept in float16, it costs half the float32 master copy
        self.weight = nn.Parameter(self.weight.detach().half(), requires_grad=False)
        self.zero.requires_grad_(False)

    def _effective_scale(self) -> torch.Tensor:
        """The step size the forward uses: float16-rounded, in [2^-24, 65504], identity gradient."""
        return straight_through(self.scale, self.scale.detach().clamp(_F16_TINY, _F16_MAX).half().float())

    def _effective_zero(self) -> torch.Tensor:
        """The zero point the forward uses: an integer in [0, q_max], identity gradient."""
        z = torch.round(self.zero.detach()).clamp(min=0).minimum(self.qmax.unsqueeze(-1))
        return straight_through(self.zero, z)

    def dequantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (out, in), float32, differentiable."""
        w = self.weight
        if self.codes is not None:
            z = self._effective_zero().detach().unsqueeze(-1)
            w_q = ungrouped((self.codes.float() - z) * self._effective_scale().unsqueeze(-1), self.in_features)
            return self._by_row(w, w_q)
        w_q = fake_quant_rows(
            w,
            self._effective_scale(),
            self._effective_zero(),
            self.qmax,
            self.group_size,
            self.round_mode,
            self.temperature,
            self.clamp_mode,
            self.beta,
            soft_forward=self.soft_forward,
        )
        return self._by_row(w, w_q)

    def _by_row(self, w: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
        """``w_q`` on the quantized rows, float16-rounded ``w`` on kept ones, 0 on pruned ones."""
        w_16 = straight_through(w, w.detach().half().float())
        rows = self.bits.unsqueeze(-1)
        return torch.where(rows == KEEP_WIDTH, w_16, torch.where(rows == PRUNE_WIDTH, torch.zeros_like(w), w_q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales float16, zeros uint8), each (out, n_groups), as the forward uses them; rows
        not at a width 2..8 get 1 and 0."""
        quant = ((self.bits >= QUANT_WIDTHS[0]) & (self.bits <= QUANT_WIDTHS[-1])).unsqueeze(-1)
        scales = torch.where(quant, self._effective_scale(), 1.0).half()
        zeros = torch.where(quant, self._effective_zero(), 0.0).to(torch.uint8)
        return scales, zeros

    @torch.no_grad()
    def to_packed(self) -> PackedLinear:
        """The :class:`PackedLinear` storing this layer's current codes, scales and zeros."""
        scales, zeros = self.qparams()
        w = self.weight if self.codes is None else self.dequantized_weight()  # its codes are the frozen ones
        tensors = pack_weight(w, self.bits, self.group_size, scales=scales, zeros=zeros)
        return PackedLinear(
            self.in_features, self.out_features, self.group_size, tensors, self.bias, compute_dtype=self.compute_dtype
        ).to(self.weight.device)

    def extra_repr(self) -> str:
        counts = torch.bincount(self.bits.long(), minlength=KEEP_WIDTH + 1)
        widths = ", ".join(f"{b}b:{int(counts[b])}" for b in range(KEEP_WIDTH + 1) if counts[b])
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"rows=[{widths}], round={self.round_mode}(T={self.temperature}), clamp={self.clamp_mode}"
            f"(beta={self.beta})" + (", soft_forward" if self.soft_forward else "")
        )


def prepare(model: nn.Module, plan: BitPlan, **opts) -> dict[str, QuantLinear]:
    """Make ``model`` ready for QAT under ``plan``, in place; returns the :class:`QuantLinear`
    modules by layer name (``opts`` go to each of them).

    Linear targets become :class:`QuantLinear`. Embedding targets are not trained: they are
    replaced right away by their frozen packed form, as ``apply.pack_model`` does (a tied lm_head
    by a :class:`~bitsearch.packed.PackedTiedHead`), whose forward is the grid's fake
    quantization. (Fake-quantizing them in place instead would lose the grid parameters: the
    min-max grid of an already fake-quantized row is in general another grid, so they could
    not be packed to the same values later.) Other parameters of the model are left as they
    are; freezing them is the training loop's choice. Plans with coupled pruning are refused
    (their consumers are stored without the freed columns, which QAT does not model yet).
    """
    if getattr(plan, "couplings", None):
        raise BitsearchError("finalizing a plan with coupled pruning is not supported yet")
    targets = plan_targets(model, plan, check_weights=False)
    embeddings = {t.name: plan.bits[t.name] for t in targets if t.kind == "embedding"}
    if embeddings:
        pack_model(model, replace(plan, bits=embeddings))
    out = {}
    for t in targets:
        if t.kind == "linear":
            out[t.name] = QuantLinear(
                model.get_submodule(t.name), torch.as_tensor(plan.bits[t.name]), plan.group_size, **opts
            )
            model.set_submodule(t.name, out[t.name])
    return out


def convert(model: nn.Module, plan: BitPlan) -> nn.Module:
    """Replace, in place, every :class:`QuantLinear` of a model made by :func:`prepare` by its
    :class:`PackedLinear`; the packed targets then hold exactly ``plan.n_bytes()`` bytes."""
    for name, bits in plan.bits.items():
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            if not torch.equal(mod.bits.cpu(), torch.as_tensor(bits, dtype=torch.uint8)):
                raise BitsearchError(f"layer '{name}' was prepared under other widths than this plan's")
            model.set_submodule(name, mod.to_packed())
        elif not isinstance(mod, PackedEmbedding):
            raise BitsearchError(f"layer '{name}' is a {type(mod).__name__}, not prepared for QAT by this plan")
    return model
