"""Apply a plan to a model in memory: check the plan's layers against the model, fake-quantize the
targets in place (dequantized values in the float layers), or pack them in place (``PackedLinear``
/ ``PackedEmbedding`` at the plan's widths). Files are written by :mod:`bitsearch.io.checkpoint`.
"""

from __future__ import annotations

import torch
from torch import nn

from .couplings import physical_layout
from .errors import BitsearchError
from .io.plan import BitPlan
from .models import Target, model_fingerprint, target_of, tied_linears
from .packed import PackedTiedHead, pack_module
from .quant.grid import fake_quantize

__all__ = ["plan_targets", "fake_quantize_model", "pack_model", "set_module"]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def plan_targets(model: nn.Module, plan: BitPlan, where: str = "plan", check_weights: bool = True) -> list[Target]:
    """The plan's layers as targets of ``model``, checked against the model's fingerprint (config
    and shapes; with ``check_weights`` also the digest of the float weights the plan was made on,
    which the stages' entry points check once, before any weight is changed)."""
    modules = dict(model.named_modules())
    targets = []
    for name, (out_f, in_f) in plan.shapes.items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            raise BitsearchError(f"{where}: layer '{name}' is not a linear or embedding layer of this model")
        targets.append(target_of(name, mod, tied_linears(model, name) if isinstance(mod, nn.Embedding) else ()))
    plan.check_model(model_fingerprint(model, targets), where, force=not check_weights)
    return targets


@torch.no_grad()
def fake_quantize_model(model: nn.Module, plan: BitPlan) -> nn.Module:
    """Replace each target weight, in place, by its planned quantize-dequantize values (a
    coupled consumer: its live columns quantized as stored, its freed columns zero)."""
    modules = dict(model.named_modules())
    _, columns = physical_layout(plan.couplings, plan.bits)
    for name, bits in plan.bits.items():
        w = modules[name].weight
        live = torch.as_tensor(columns[name]).to(w.device) if name in columns else None
        src = w.detach().float()
        src = src[:, live] if live is not None else src.clone()
        b_t = torch.as_tensor(bits)
        for b in sorted(set(bits.tolist())):
            rows = (b_t == b).nonzero().flatten().to(w.device)
            src[rows] = fake_quantize(src[rows], int(b), plan.group_size)
        if live is not None:
            new = torch.zeros_like(w, dtype=torch.float32)
            new[:, live] = src
            src = new
        w.copy_(src.to(w.dtype))
    return model


def pack_model(model: nn.Module, plan: BitPlan, qparams: dict | None = None) -> nn.Module:
    """Replace each target, in place, by a :class:`PackedLinear` / :class:`PackedEmbedding` at
    its planned widths; ``qparams`` {name: (scales, zeros)} replaces the min-max grids of those
    layers (weights already rounded by SignRound or trained by QAT)."""
    qparams = qparams or {}
    modules = dict(model.named_modules())
    rows, columns = physical_layout(plan.couplings, plan.bits)
    for name, bits in plan.bits.items():
        mod = modules[name]
        heads = tied_linears(model, name) if isinstance(mod, nn.Embedding) else ()
        packed = pack_module(
            mod,
            torch.as_tensor(bits),
            plan.group_size,
            rows=rows.get(name),
            columns=columns.get(name),
            qparams=qparams.get(name),
        ).to(mod.weight.device)
        set_module(model, name, packed)
        for h in heads:
            set_module(model, h, PackedTiedHead(packed, modules[h].bias))
    return model
