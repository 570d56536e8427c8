"""QAT training loops: end to end, forward tiled, or tiled then end to end.

``e2e``: the whole model, each target a :class:`~.quantizer.QuantLinear`, trained by
distillation: KL(float || quantized) over next-token distributions of calibration samples
(plus ``ce_weight`` x cross-entropy on the samples' next tokens), against a frozen float copy.

``tiled`` (the proposal's forward tiled QAT): decoder blocks in tiles of ``tile_size``, trained in
order from the input. Tile t's target is the float tile's output on the float model's input to
it; the quantized tile's input is what the already quantized tiles before it produce (so each
tile learns to correct the error it is handed). Only the current tile has trainable state
(gradients and optimizer moments); the tiles after it are still float ``nn.Linear`` layers, the
ones before are frozen. No float copy of the model is needed. ``tiled+e2e`` adds ``e2e_steps``
of end-to-end distillation after the tiles. ``tile_guard`` (default on) measures each tile's
loss on all samples before and after its training and keeps the tile's initial parameters
(round-to-nearest's or SignRound's) when training made that loss worse, as SignRound keeps its
best step: too high a learning rate throws SignRound's rounding across grid boundaries
(README), and the guard makes such a tile a no-op instead of damage.

Every step draws ``batch_size`` samples (seeded). Learning rate: linear warm-up over the first
5 % of a phase's steps, then cosine decay to 0; scales and zeros may have their own
(``qparam_lr``). Options for the paper's open choices: ``anneal`` raises the Sigmoid-STE
temperature linearly from 0 to ``temperature`` over a phase; ``soft_warmup`` steps use the
surrogates' values in the forward too. Embedding targets are not trained (see ``prepare``).

A checkpoint (every ``checkpoint_every`` seconds and at the end of each tile, atomically) holds
the phase, tile, step, every trained layer's parameters and the optimizer; ``resume`` continues
from it with no step lost or repeated.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import BlockRunner
from ..errors import BitsearchError
from ..io.plan import BitPlan
from ..models import decoder_blocks
from ..progress import progress
from ..quantize import pack_model, plan_targets
from .quantizer import QuantLinear

__all__ = ["QatSettings", "MODES", "finalize_qat", "checkpointed_start"]

MODES = ("e2e", "tiled", "tiled+e2e")
TRAINABLE = ("all", "scales")
_CKPT_FORMAT = "bitsearch-qat-checkpoint"


@dataclass
class QatSettings:
    """One QAT run's settings. These defaults are the training loop's own (tiled from round-to-
    nearest, every weight trained); ``bitsearch finalize`` fills its unset options from
    :mod:`.recipes` instead."""

    mode: str = "tiled"  # from round-to-nearest, the CPU study: tiled 224.7 vs e2e 233.9 at 2.5 bits
    steps: int = 200  # e2e: steps; tiled: steps per tile
    e2e_steps: int | None = None  # tiled+e2e: steps of the end-to-end pass (default steps // 2)
    lr: float = 1e-4
    qparam_lr: float | None = None  # scales and zeros (default: lr)
    batch_size: int = 8
    round_mode: str = "ste"
    temperature: float = 0.0
    anneal: bool = False
    clamp_mode: str = "hard"
    beta: float = 1.0
    soft_warmup: int = 0
    tile_size: int = 3
    tile_loss: str = "l2"
    tile_guard: bool = True
    ce_weight: float = 0.0
    trainable: str = "all"  # "scales": codes and zeros frozen at the start's rounding
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: float = 300.0
    resume: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise BitsearchError(f"`mode` '{self.mode}' is not one of {', '.join(MODES)}")
        if self.trainable not in TRAINABLE:
            raise BitsearchError(f"`trainable` '{self.trainable}' is not one of {', '.join(TRAINABLE)}")
        if self.tile_loss not in ("l2", "l1"):
            raise BitsearchError(f"tile_loss '{self.tile_loss}' is not l2 or l1")
        if self.steps < 0 or self.batch_size < 1 or self.tile_size < 1:
            raise BitsearchError("`steps` must be >= 0, batch_size and tile_size >= 1")
        if self.lr <= 0 or self.temperature < 0 or self.beta <= 0:
            raise BitsearchError("`lr` and `beta` must be positive, `temperature` >= 0")

    def layer_options(self) -> dict:
        return {
            "round_mode": self.round_mode,
            "temperature": self.temperature,
            "clamp_mode": self.clamp_mode,
            "beta": self.beta,
        }


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _plan_key(plan: BitPlan) -> str:
    h = hashlib.sha256(plan.model.get("sha256", "").encode())
    for name in sorted(plan.bits):
        h.update(name.encode())
        h.update(plan.bits[name].tobytes())
    return h.hexdigest()


class _Trainer:
    """One phase's optimizer, schedule, surrogate options and checkpointing."""

    def __init__(
        self,
        plan: BitPlan,
        settings: QatSettings,
        layers: dict[str, QuantLinear],
        steps: int,
        phase: str,
        tile: int,
        state: dict,
    ):
        self.plan, self.s, self.layers, self.steps, self.phase, self.tile = plan, settings, layers, steps, phase, tile
        self.state = state  # shared across phases: trained layers, history, last save time
        qlr = settings.qparam_lr or settings.lr
        if settings.trainable == "scales":
            groups = [{"params": [m.scale for m in layers.values()], "lr": qlr}]
        else:
            groups = [
                {"params": [m.weight for m in layers.values()], "lr": settings.lr},
                {"params": [p for m in layers.values() for p in (m.scale, m.zero)], "lr": qlr},
            ]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        self.opt = torch.optim.Adam(groups)
        self.base = [g["lr"] for g in self.opt.param_groups]
        self.step = 0

    def set_step_options(self) -> None:
        t = self.s.temperature * (self.step + 1) / self.steps if self.s.anneal else self.s.temperature
        for m in self.layers.values():
            m.temperature = t
            m.soft_forward = self.step < self.s.soft_warmup
        f = _lr_factor(self.step, self.steps)
        for g, b in zip(self.opt.param_groups, self.base):
            g["lr"] = b * f

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1

    def finish(self) -> None:
        """Freeze this phase's layers and drop its optimizer state."""
        for m in self.layers.values():
            m.soft_forward = False
            m.temperature = self.s.temperature
            for p in (m.weight, m.scale, m.zero):
                p.requires_grad_(False)
                p.grad = None
        self.opt = None

    def maybe_save(self, force: bool = False) -> None:
        if not self.s.checkpoint or not (force or time.time() - self.state["saved"] >= self.s.checkpoint_every):
            return
        all_layers = dict(self.state["trained"])
        all_layers.update(self.layers)
        optimizer = self.opt.state_dict() if self.opt is not None else None
        _save_checkpoint(self.plan, self.s, self.phase, self.tile, self.step, all_layers, optimizer, self.state)

    def restore(self, ckpt: dict | None) -> None:
        if ckpt and ckpt["phase"] == self.phase and ckpt["tile"] == self.tile:
            self.step = ckpt["step"]
            if ckpt["optimizer"] is not None:
                self.opt.load_state_dict(ckpt["optimizer"])


def _save_checkpoint(plan, settings, phase, tile, step, layers, optimizer, state) -> None:
    """Write the checkpoint atomically: where training stands, every trained layer, the optimizer and
    the start (``state["start"]``: the initial rounding, so a resumed run need not round again)."""
    ckpt = {
        "format": _CKPT_FORMAT,
        "plan": _plan_key(plan),
        "settings": asdict(settings),
        "phase": phase,
        "tile": tile,
        "step": step,
        "layers": {n: {k: v.detach().cpu() for k, v in m.state_dict().items()} for n, m in layers.items()},
        "optimizer": optimizer,
        "history": state["history"],
        "guard": state["guard"],
        "start": state.get("start"),
    }
    path = settings.checkpoint
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    state["saved"] = time.time()


def _load_checkpoint(plan: BitPlan, settings: QatSettings) -> dict | None:
    path = settings.checkpoint
    if not settings.resume:
        return None
    if not path or not os.path.isfile(path):
        raise BitsearchError(f"`resume`: no checkpoint at '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BitsearchError(f"checkpoint '{path}' is unreadable: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        raise BitsearchError(f"'{path}' is not a bitsearch QAT checkpoint")
    if ckpt["plan"] != _plan_key(plan):
        raise BitsearchError(f"checkpoint '{path}' was made for another plan or model")
    mine = {k: v for k, v in asdict(settings).items() if k not in ("resume", "checkpoint", "checkpoint_every")}
    theirs = {k: v for k, v in ckpt["settings"].items() if k in mine}
    diff = [k for k in mine if theirs.get(k) != mine[k]]
    if diff:
        raise BitsearchError(
            f"checkpoint '{path}' was made with other settings ({diff[0]}: "
            f"{theirs.get(diff[0])!r}, now {mine[diff[0]]!r})"
        )
    return ckpt


def checkpointed_start(plan: BitPlan, settings: QatSettings) -> dict | None:
    """The ``start`` record the checkpoint being resumed holds (None when not resuming, or when the
    checkpoint has none)."""
    ckpt = _load_checkpoint(plan, settings)
    return ckpt.get("start") if ckpt else None


def _quantize_layers(
    model: nn.Module,
    plan: BitPlan,
    names: list[str],
    settings: QatSettings,
    ckpt: dict | None,
    init_qparams: dict | None,
) -> dict[str, QuantLinear]:
    """Replace the float Linears ``names`` by QuantLinears (restoring checkpointed parameters;
    ``init_qparams`` {name: (scales, zeros)} replaces the min-max initial ones, e.g. SignRound's)."""
    out = {}
    for name in names:
        ql = QuantLinear(
            model.get_submodule(name),
            torch.as_tensor(plan.bits[name]),
            plan.group_size,
            learn_weight=False,
            learn_scale=False,
            learn_zero=False,
            **settings.layer_options(),
        )
        if init_qparams and name in init_qparams:
            scales, zeros = init_qparams[name]
            with torch.no_grad():
                ql.scale.copy_(scales.float())
                ql.zero.copy_(zeros.float())
        if settings.trainable == "scales":
            ql.freeze_codes()
        if ckpt and name in ckpt["layers"]:
            ql.load_state_dict(ckpt["layers"][name])
        model.set_submodule(name, ql)
        out[name] = ql
    return out


def _samples(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k] if k < n else torch.arange(n)


def _bar(total: int, desc: str, enable: bool):
    return progress(range(total), desc=desc, enable=enable)


def _postfix(bar, **kw) -> None:
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(**kw, refresh=False)


@contextmanager
def _weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """The given weights in place for the duration (e.g. the float ones under SignRound's)."""
    saved = {}
    with torch.no_grad():
        for name, w in weights.items():
            mod = model.get_submodule(name)
            saved[name] = mod.weight.detach().clone()
            mod.weight.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def _run_tiled(
    model, plan, batch, settings, linear_names, state, ckpt, init_qparams, float_weights, show_progress
) -> None:
    runner = BlockRunner(model)
    prefix, blocks = decoder_blocks(model)
    n_tiles = math.ceil(len(blocks) / settings.tile_size)
    start_tile = ckpt["tile"] if ckpt and ckpt["phase"] == "tiled" else (n_tiles if ckpt else 0)
    outside = {n: w for n, w in float_weights.items() if n not in linear_names}  # embeddings
    with torch.no_grad(), _weights(model, outside):  # block kwargs of one sample broadcast over any batch
        _, kw = runner.capture(batch[:1])
        hf = torch.cat([runner.capture(batch[i : i + 1])[0] for i in range(batch.shape[0])])
    embeddings = {n: b for n, b in plan.bits.items() if n not in linear_names}
    hq = hf  # the quantized stream: the same inputs unless the embeddings are quantized too
    if embeddings:
        pack_model(model, replace(plan, bits=embeddings, couplings=[]), init_qparams)
        with torch.no_grad():
            hq = torch.cat([runner.capture(batch[i : i + 1])[0] for i in range(batch.shape[0])])

    def tile_loss(x, y) -> torch.Tensor:
        diff = x.float() - y.float()
        return diff.pow(2).mean() if settings.tile_loss == "l2" else diff.abs().mean()

    def run(tile_blocks, h):
        outs = []
        for i in range(0, h.shape[0], settings.batch_size):
            x = h[i : i + settings.batch_size]
            for b in tile_blocks:
                x = runner.run_block(b, x, kw)
            outs.append(x)
        return torch.cat(outs)

    for t in range(n_tiles):
        idx = list(range(t * settings.tile_size, min(len(blocks), (t + 1) * settings.tile_size)))
        tile_blocks = [blocks[i] for i in idx]
        names = [n for n in linear_names if any(n.startswith(f"{prefix}.{i}.") for i in idx)]
        with torch.no_grad(), _weights(model, {n: float_weights[n] for n in names if n in float_weights}):
            target = run(tile_blocks, hf)  # float tile on float inputs (still float Linears)
        nxt = None  # the tile's output on hq, when the guard computed it
        if t < start_tile:  # done before the checkpoint
            state["trained"].update(_quantize_layers(model, plan, names, settings, ckpt, init_qparams))
        else:
            layers = _quantize_layers(model, plan, names, settings, None, init_qparams)
            initial = {n: copy.deepcopy(m.state_dict()) for n, m in layers.items()}
            with torch.no_grad():
                before = float(tile_loss(run(tile_blocks, hq), target)) if settings.tile_guard else None
            if ckpt and t == start_tile:
                for n, m in layers.items():
                    if n in ckpt["layers"]:
                        m.load_state_dict(ckpt["layers"][n])
            trainer = _Trainer(plan, settings, layers, settings.steps, "tiled", t, state)
            trainer.restore(ckpt)
            gen = torch.Generator().manual_seed(settings.seed * 1000 + t)
            for _ in range(trainer.step):  # the samples the steps before the checkpoint drew
                _samples(hq.shape[0], settings.batch_size, gen)
            bar = _bar(settings.steps - trainer.step, f"tile {t + 1}/{n_tiles}", show_progress)
            for _ in bar:
                t0 = time.time()
                trainer.set_step_options()
                sel = _samples(hq.shape[0], settings.batch_size, gen)
                x = hq[sel]
                for b in tile_blocks:
                    x = runner.run_block(b, x, kw)
                loss = tile_loss(x, target[sel])
                trainer.update(loss)
                state["history"].append(("tiled", t, trainer.step, float(loss.detach())))
                _postfix(
                    bar,
                    loss=f"{loss.item():.4g}",
                    lr=f"{trainer.opt.param_groups[0]['lr']:.2e}",
                    tok_s=f"{x.shape[0] * x.shape[1] / (time.time() - t0):.0f}",
                )
                trainer.maybe_save()
            trainer.finish()
            if settings.tile_guard:
                with torch.no_grad():
                    nxt = run(tile_blocks, hq)
                after = float(tile_loss(nxt, target))
                state["guard"].append({"tile": t, "before": before, "after": after, "kept_initial": after > before})
                if after > before:
                    for n, m in layers.items():
                        m.load_state_dict(initial[n])
                    nxt = None
            state["trained"].update(layers)
            trainer.tile, trainer.step = t + 1, 0  # the checkpoint says: tiles up to t are done
            trainer.maybe_save(force=True)
        with torch.no_grad():
            hq = run(tile_blocks, hq) if nxt is None else nxt
            hf = target
        del target
    rest = [n for n in linear_names if n not in state["trained"]]  # e.g. an untied lm_head: not trained here
    state["trained"].update(_quantize_layers(model, plan, rest, settings, ckpt, init_qparams))


def _run_e2e(model, teacher, plan, batch, settings, steps, state, ckpt, show_progress) -> None:
    layers = dict(state["trained"])
    trainer = _Trainer(plan, settings, layers, steps, "e2e", 0, state)
    trainer.restore(ckpt)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    for _ in range(trainer.step):  # the samples the steps before the checkpoint drew
        _samples(batch.shape[0], settings.batch_size, gen)
    dev = next(model.parameters()).device
    bar = _bar(steps - trainer.step, "qat e2e", show_progress)
    for _ in bar:
        t0 = time.time()
        trainer.set_step_options()
        x = batch[_samples(batch.shape[0], settings.batch_size, gen)].to(dev)
        with torch.no_grad():
            ref = F.log_softmax(teacher(input_ids=x, use_cache=False).logits[:, :-1].float(), dim=-1)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        lp = F.log_softmax(logits, dim=-1)
        loss = (ref.exp() * (ref - lp)).sum(-1).mean()
        if settings.ce_weight:
            loss = loss + settings.ce_weight * F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            )
        trainer.update(loss)
        state["history"].append(("e2e", 0, trainer.step, float(loss.detach())))
        _postfix(
            bar,
            loss=f"{loss.item():.4g}",
            lr=f"{trainer.opt.param_groups[0]['lr']:.2e}",
            tok_s=f"{x.numel() / (time.time() - t0):.0f}",
        )
        trainer.maybe_save()
    trainer.finish()
    trainer.maybe_save(force=True)


def finalize_qat(
    model: nn.Module,
    plan: BitPlan,
    batch: torch.Tensor,
    settings: QatSettings,
    show_progress: bool = True,
    init_qparams: dict | None = None,
    float_weights: dict[str, torch.Tensor] | None = None,
    start: dict | None = None,
) -> dict:
    """Train ``model`` (in place) under ``plan`` on the token ``batch`` (N, T); its targets are
    left as :class:`QuantLinear` modules (``quantizer.convert`` packs them). ``init_qparams``
    {layer: (scales, zeros)} start the step sizes and zeros (with the model's weights as they
    are, e.g. SignRound's rounded ones) instead of min-max; then ``float_weights`` {layer: the
    float weight} must give the float model the training matches (teacher and tile targets); in
    e2e mode the dict is emptied once the teacher holds them. ``start`` (any picklable record of
    that initial rounding) is written into every checkpoint, the first one before training
    begins; :func:`checkpointed_start` reads it back. Returns info."""
    settings.check()
    if plan.couplings:
        raise BitsearchError("finalizing a plan with coupled pruning is not supported yet")
    targets = plan_targets(model, plan, check_weights=False)
    linear_names = [t.name for t in targets if t.kind == "linear"]
    ckpt = _load_checkpoint(plan, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    state = {
        "trained": {},
        "history": list(ckpt["history"]) if ckpt else [],
        "saved": time.time(),
        "guard": list(ckpt.get("guard", [])) if ckpt else [],
        "start": start if start is not None else (ckpt.get("start") if ckpt else None),
    }
    if start is not None and settings.checkpoint and ckpt is None:  # keep the rounding from the first moment
        _save_checkpoint(plan, settings, "tiled" if settings.mode.startswith("tiled") else "e2e", 0, 0, {}, None, state)
    t0 = time.time()
    e2e_steps = (
        settings.steps
        if settings.mode == "e2e"
        else (settings.e2e_steps if settings.e2e_steps is not None else settings.steps // 2)
    )
    teacher = None
    if settings.mode != "tiled":
        teacher = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, w in (float_weights or {}).items():
                teacher.get_submodule(name).weight.copy_(w)
        if settings.mode == "e2e" and float_weights:
            float_weights.clear()  # the teacher holds them now: the caller's copy is freed
    if settings.mode.startswith("tiled"):
        _run_tiled(
            model, plan, batch, settings, linear_names, state, ckpt, init_qparams, float_weights or {}, show_progress
        )
        if ckpt and ckpt["phase"] == "tiled":
            ckpt = None  # the e2e phase starts fresh
    else:
        embeddings = {n: b for n, b in plan.bits.items() if n not in linear_names}
        if embeddings:
            pack_model(model, replace(plan, bits=embeddings, couplings=[]), init_qparams)
        state["trained"].update(_quantize_layers(model, plan, linear_names, settings, ckpt, init_qparams))
    if settings.mode != "tiled":
        _run_e2e(model, teacher, plan, batch, settings, e2e_steps, state, ckpt, show_progress)
    hist = state["history"]
    first = {ph: next((h[3] for h in hist if h[0] == ph), None) for ph in ("tiled", "e2e")}
    last = {ph: next((h[3] for h in reversed(hist) if h[0] == ph), None) for ph in ("tiled", "e2e")}
    return {
        "mode": settings.mode,
        "seconds": round(time.time() - t0, 1),
        "steps_run": len(hist),
        "first_loss": first,
        "last_loss": last,
        "tile_guard": state["guard"],
        "settings": asdict(settings),
    }
