"""QAT loops: e2e and tiled training lower the KL to the float model, tiled mode holds one
tile's training state, convert keeps the plan's bytes, a killed run resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitsearch.errors import BitsearchError
from bitsearch.finalize import train as train_mod
from bitsearch.finalize.quantizer import QuantLinear, convert
from bitsearch.finalize.train import QatSettings, finalize_qat
from bitsearch.io.loading import load_model
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.packed import PackedLinear
from bitsearch.quantize import fake_quantize_model

GS = 32


class Killed(Exception):
    """Stands for the process dying mid-step."""


def _plan(model, seed=0) -> BitPlan:
    rng = np.random.default_rng(seed)
    targets = find_targets(model)
    bits = {t.name: rng.choice([2, 3], size=t.out_features).astype(np.uint8) for t in targets}
    plan = BitPlan(model=model_fingerprint(model, targets), group_size=GS, menu=[2, 3], bits=bits)
    plan.fill_summary()
    return plan


def _kl(model, ref, ids) -> float:
    with torch.no_grad():
        p = F.log_softmax(ref(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _batch(model, n=16, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


@pytest.mark.parametrize("mode", ["e2e", "tiled", "tiled+e2e"])
def test_training_lowers_kl_and_converts_to_the_plan_bytes(llama_dir, mode):
    torch.manual_seed(0)
    ref = load_model(llama_dir)
    model = load_model(llama_dir)
    plan = _plan(model)
    batch = _batch(model)
    held = _batch(model, 8, 32, seed=1)
    rtn = fake_quantize_model(load_model(llama_dir), plan)
    info = finalize_qat(
        model, plan, batch, QatSettings(mode=mode, steps=40, lr=1e-3, batch_size=8, tile_size=1), show_progress=False
    )
    assert info["steps_run"] == {"e2e": 40, "tiled": 80, "tiled+e2e": 100}[mode]
    # on the training samples clearly, on held-out (random) tokens still, below round-to-nearest
    assert _kl(model, ref, batch) < 0.7 * _kl(rtn, ref, batch)
    assert _kl(model, ref, held) < _kl(rtn, ref, held)
    with torch.no_grad():
        before = model(input_ids=held).logits
    convert(model, plan)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len([n for n in plan.bits if "embed" not in n])
    assert sum(m.packed_bytes() for m in model.modules() if hasattr(m, "packed_bytes")) == plan.n_bytes()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=held).logits, before, rtol=1e-4, atol=1e-4)


def test_tiled_mode_holds_one_tile_of_training_state(llama_dir, monkeypatch):
    model = load_model(llama_dir)
    plan = _plan(model)
    seen = []
    original = train_mod._Trainer.update

    def update(self, loss):
        original(self, loss)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        with_state = {n for n, p in model.named_parameters() if p in self.opt.state}
        quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        seen.append((self.tile, trainable, with_state, quant))

    monkeypatch.setattr(train_mod._Trainer, "update", update)
    finalize_qat(
        model,
        plan,
        _batch(model, 8),
        QatSettings(mode="tiled", steps=3, tile_size=1, batch_size=4),
        show_progress=False,
    )
    assert {s[0] for s in seen} == {0, 1}
    for tile, trainable, with_state, quant in seen:
        block = f"model.layers.{tile}."
        assert trainable and all(n.startswith(block) for n in trainable)
        assert with_state <= trainable
        # layers of later tiles are still float; earlier ones are quantized and frozen
        assert all(int(n.split(".")[2]) <= tile for n in quant)


def _kill_after(monkeypatch, n: int) -> None:
    """Make the QAT step after ``n`` completed ones die (until ``monkeypatch.undo``)."""
    original = train_mod._Trainer.update
    calls = {"n": 0}

    def update(self, loss):
        if calls["n"] == n:
            raise Killed
        calls["n"] += 1
        original(self, loss)

    monkeypatch.setattr(train_mod._Trainer, "update", update)


def test_killed_run_resumes_to_the_same_model(llama_dir, tmp_path, monkeypatch):
    batch = _batch(load_model(llama_dir), 8)
    ckpt = str(tmp_path / "qat.ckpt")

    def run(resume=False, kill_after=None):
        model = load_model(llama_dir)
        plan = _plan(model)
        if kill_after is not None:
            _kill_after(monkeypatch, kill_after)
        settings = QatSettings(
            mode="tiled+e2e",
            steps=4,
            e2e_steps=4,
            tile_size=1,
            batch_size=4,
            lr=1e-3,
            checkpoint=ckpt,
            checkpoint_every=0.0,
            resume=resume,
        )
        try:
            finalize_qat(model, plan, batch, settings, show_progress=False)
        finally:
            monkeypatch.undo()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    straight = run()
    for kill_after in (2, 6, 9):  # inside tile 0, inside tile 1, inside the e2e pass
        with pytest.raises(Killed):
            run(kill_after=kill_after)
        resumed = run(resume=True)
        for n, p in straight.items():
            torch.testing.assert_close(resumed[n], p, rtol=1e-5, atol=1e-6, msg=f"{n} after kill at {kill_after}")


@pytest.mark.parametrize("mode", ["e2e", "tiled"])
def test_a_resumed_run_takes_the_start_from_the_checkpoint_instead_of_rounding_again(
    llama_dir, tmp_path, monkeypatch, mode
):
    """The default recipe starts QAT from SignRound: a killed run's checkpoint keeps that rounding
    (from before the first step), and the resumed run ends with the uninterrupted run's model
    without calling SignRound again; another start is refused."""
    from bitsearch.config import FinalizeConfig
    from bitsearch.finalize import get_finalizer
    from bitsearch.finalize.signround import SignRoundFinalizer

    batch = _batch(load_model(llama_dir), 8)
    ckpt = str(tmp_path / f"{mode}.ckpt")
    rounds = {"n": 0}
    original_round = SignRoundFinalizer.round

    def counting_round(self, *a, **k):
        rounds["n"] += 1
        return original_round(self, *a, **k)

    def run(resume=False, kill_after=None, **changes):
        model = load_model(llama_dir)
        monkeypatch.setattr(SignRoundFinalizer, "round", counting_round)
        if kill_after is not None:
            _kill_after(monkeypatch, kill_after)
        config = FinalizeConfig(
            **dict(
                dict(mode=mode, init="signround", steps=3, tile_size=1, batch_size=4, lr=1e-3, signround_steps=3),
                **changes,
            ),
            checkpoint_every=1e9,  # only the forced saves: the start, and the end of each tile
            resume=resume,
            show_progress=False,
        )
        try:
            info = get_finalizer("qat").finalize(
                model, _plan(model), batch, config, show_progress=False, checkpoint=ckpt
            )
        finally:
            monkeypatch.undo()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, info

    straight, info = run()
    assert rounds["n"] == 1 and info["signround"]["resumed"] is False
    for kill_after in (0, 4) if mode == "tiled" else (0,):  # before the first step; inside tile 1
        with pytest.raises(Killed):
            run(kill_after=kill_after)
        rounds["n"] = 0
        resumed, info = run(resume=True)
        assert rounds["n"] == 0 and info["signround"]["resumed"] is True
        for n, p in straight.items():
            torch.testing.assert_close(resumed[n], p, rtol=1e-5, atol=1e-6, msg=f"{n} after kill at {kill_after}")
    with pytest.raises(Killed):
        run(kill_after=0)
    with pytest.raises(BitsearchError, match="another start .signround_steps: 3, now 4"):
        run(resume=True, signround_steps=4)


def test_resume_refuses_other_settings(llama_dir, tmp_path):
    model = load_model(llama_dir)
    plan = _plan(model)
    ckpt = str(tmp_path / "c.pt")
    finalize_qat(
        model,
        plan,
        _batch(model, 4),
        QatSettings(steps=1, batch_size=2, checkpoint=ckpt, checkpoint_every=0.0),
        show_progress=False,
    )
    with pytest.raises(BitsearchError, match="other settings"):
        finalize_qat(
            load_model(llama_dir),
            plan,
            _batch(model, 4),
            QatSettings(steps=1, batch_size=2, lr=1.0, checkpoint=ckpt, resume=True),
            show_progress=False,
        )


def test_tile_guard_keeps_a_tile_that_training_made_worse(llama_dir):
    """An absurd learning rate wrecks every tile: the guard puts back the initial
    (round-to-nearest) parameters; without it the wreck stays."""
    ref = load_model(llama_dir)
    batch = _batch(ref, 8)
    rtn = fake_quantize_model(load_model(llama_dir), _plan(ref))

    def run(guard):
        model = load_model(llama_dir)
        info = finalize_qat(
            model,
            _plan(model),
            batch,
            QatSettings(mode="tiled", steps=5, lr=1.0, tile_size=1, batch_size=4, tile_guard=guard),
            show_progress=False,
        )
        return model, info

    guarded, info = run(True)
    assert [g["tile"] for g in info["tile_guard"]] == [0, 1]
    assert all(g["kept_initial"] and g["after"] > g["before"] for g in info["tile_guard"])
    with torch.no_grad():
        torch.testing.assert_close(guarded(input_ids=batch).logits, rtn(input_ids=batch).logits, rtol=1e-4, atol=1e-4)
    wrecked, info = run(False)
    assert info["tile_guard"] == []
    assert _kl(wrecked, ref, batch) > 2 * _kl(guarded, ref, batch)


def test_scales_only_training_keeps_the_start_codes_and_lowers_kl(llama_dir):
    """``trainable="scales"`` from a start on the grid (round-to-nearest's weights and qparams,
    as a rounder hands them over): the step sizes alone lower the KL to the float model; the
    codes, zeros and weights stay those of the start; the packed model has the plan's bytes."""
    ref = load_model(llama_dir)
    plan = _plan(ref)
    batch = _batch(ref)
    names = [n for n in plan.bits if "embed" not in n]
    floats = {n: ref.get_submodule(n).weight.detach().clone() for n in names}
    start = fake_quantize_model(load_model(llama_dir), plan)
    qparams = {}
    for n in names:
        ql = QuantLinear(ref.get_submodule(n), torch.as_tensor(plan.bits[n]), GS)
        qparams[n] = (ql.scale.detach().clone(), ql.zero.detach().clone())
    model = load_model(llama_dir)
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).weight.copy_(start.get_submodule(n).weight)
    settings = QatSettings(mode="e2e", steps=30, lr=1e-3, batch_size=8, trainable="scales")
    finalize_qat(model, plan, batch, settings, show_progress=False, init_qparams=qparams, float_weights=floats)
    layers = {n: model.get_submodule(n) for n in names}
    moved = 0
    for n, m in layers.items():
        assert torch.equal(m.weight, start.get_submodule(n).weight.half())
        assert torch.equal(m.zero, qparams[n][1])
        start_codes = QuantLinear(start.get_submodule(n), torch.as_tensor(plan.bits[n]), GS)
        with torch.no_grad():
            start_codes.scale.copy_(qparams[n][0])
            start_codes.zero.copy_(qparams[n][1])
        start_codes.freeze_codes()
        assert torch.equal(m.codes, start_codes.codes)
        moved += int((m.scale != qparams[n][0]).sum())
    assert moved > 0
    assert _kl(model, ref, batch) < 0.9 * _kl(start, ref, batch)
    convert(model, plan)
    assert sum(m.packed_bytes() for m in model.modules() if hasattr(m, "packed_bytes")) == plan.n_bytes()
    with pytest.raises(BitsearchError, match="trainable"):
        QatSettings(trainable="codes").check()
