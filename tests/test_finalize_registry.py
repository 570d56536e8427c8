"""The finalizer registry (bitsearch.finalize.base): every registered finalizer (and every chain
from a rounding finalizer) turns a tiny Llama and a plan with every width (0, 2, 3, 4, 16) into a
packed model of exactly the plan's bytes, which saves, loads back and applies to the same
outputs, and is deterministic."""

import copy

import pytest
import torch
from plans import mixed_plan

from bitsearch.config import FinalizeConfig
from bitsearch.errors import BitsearchError
from bitsearch.finalize import FINALIZERS, GPTQSettings, Rounder, SignRoundSettings, get_finalizer, rounders
from bitsearch.io.checkpoint import load_packed, save_packed
from bitsearch.io.loading import load_model
from bitsearch.packed import PackedRows


def tokens(model, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, 32), generator=torch.Generator().manual_seed(seed))


def config(method: str, init: str = "rtn", seed: int = 0) -> FinalizeConfig:
    return FinalizeConfig(
        method=method, init=init, signround_steps=6, steps=4, batch_size=4, seed=seed, show_progress=False
    )


CHAINS = [
    ("rtn", "gptq"),
    ("rtn", "signround"),
    ("rtn", "qat"),
    ("gptq", "signround"),
    ("gptq", "qat"),
    ("signround", "qat"),
]


def test_builtin_finalizers_are_registered():
    assert {"gptq", "signround", "qat"} <= set(FINALIZERS)
    assert set(rounders()) == {"gptq", "signround"}
    assert isinstance(get_finalizer("gptq"), Rounder) and not isinstance(get_finalizer("qat"), Rounder)
    with pytest.raises(BitsearchError, match="unknown finalize method"):
        get_finalizer("nope")


@pytest.mark.parametrize("init,method", CHAINS)
def test_contract(llama_dir, tmp_path, init, method):
    """Bytes exact, saved and loaded back to the same outputs, the same result twice (seeded)."""
    ref = load_model(llama_dir)
    plan = mixed_plan(ref, r"embed_tokens|layers\.")  # tied embedding: round-to-nearest everywhere
    x, held = tokens(ref, 16, 1), tokens(ref, 4, 9)
    runs = []
    for _ in range(2):
        m = load_model(llama_dir)
        info = get_finalizer(method).finalize(m, plan, x, config(method, init), show_progress=False)
        assert isinstance(info, dict)
        runs.append(m)
    a, b = runs
    for (k, t), (k2, u) in zip(a.state_dict().items(), b.state_dict().items()):  # deterministic
        assert k == k2 and torch.equal(t, u), k
    total = 0
    for name in plan.bits:
        mod = a.get_submodule(name)
        assert isinstance(mod, PackedRows), name
        total += mod.packed_bytes()
    assert total == plan.n_bytes()  # bytes exact
    written = save_packed(a, plan, str(tmp_path / "packed"), None)
    assert written == plan.n_bytes()
    loaded = load_packed(str(tmp_path / "packed"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=held).logits, a(input_ids=held).logits)  # loads and applies
        assert not torch.equal(a(input_ids=held).logits, ref(input_ids=held).logits)


def test_refused_chains(llama_dir):
    m = load_model(llama_dir)
    plan = mixed_plan(m)
    x = tokens(m, 4, 0)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(BitsearchError, match="not a rounding method"):
        get_finalizer("signround").finalize(m, plan, x, config("signround", "qat"), show_progress=False)
    with pytest.raises(BitsearchError, match="does not start from"):
        get_finalizer("gptq").finalize(m, plan, x, config("gptq", "signround"), show_progress=False)
    assert all(torch.equal(t, before[k]) for k, t in m.state_dict().items())


@pytest.mark.parametrize("width", [2, 3])
def test_signround_from_gptq_starts_at_gptq(llama_dir, width):
    """Zero SignRound steps from GPTQ's start give GPTQ's weights and grid bit for bit (the offsets
    V0 reproduce its codes); some of those codes differ from round-to-nearest's."""
    from bitsearch.finalize.gptq import gptq_quantize
    from bitsearch.finalize.signround import signround
    from bitsearch.search.uniform import uniform_plan

    g = load_model(llama_dir)
    plan = uniform_plan(g, width, 16)
    x = tokens(g, 16, 1)
    gq = gptq_quantize(g, plan, x, GPTQSettings(micro_batch=8), show_progress=False)
    start = {n: g.get_submodule(n).weight.detach().clone() for n in plan.bits}
    s = load_model(llama_dir)
    floats = {n: s.get_submodule(n).weight.detach().clone() for n in plan.bits}
    res = signround(s, plan, x, SignRoundSettings(steps=0), show_progress=False, start=start)
    differs = 0
    for n in plan.bits:
        assert torch.equal(s.get_submodule(n).weight, start[n]), n
        assert torch.equal(res[n][0], gq[n][0]) and torch.equal(res[n][1], gq[n][1]), n
        sc = res[n][0].float().repeat_interleave(16, dim=1)
        differs += int((torch.round(floats[n] / sc) != torch.round(start[n] / sc)).sum())
    assert differs > 0
    assert all(b["best_step"] == -1 for b in res.block_losses)
