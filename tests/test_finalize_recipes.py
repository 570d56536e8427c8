"""The finalizers' default recipes: what a FinalizeConfig left at its defaults runs, and what the
finalized plan records."""

import pytest
import torch

from bitsearch import api
from bitsearch.config import FinalizeConfig
from bitsearch.finalize.recipes import RECIPES, resolve_defaults
from bitsearch.io.loading import load_model
from bitsearch.search.uniform import uniform_plan


def test_the_default_is_signround_then_the_step_sizes_end_to_end():
    c = resolve_defaults(FinalizeConfig())
    assert (c.method, c.init, c.mode, c.trainable, c.steps, c.lr) == ("qat", "signround", "e2e", "scales", 100, 2e-5)


@pytest.mark.parametrize("mode", ["tiled", "tiled+e2e"])
def test_tiled_modes_start_from_round_to_nearest_and_train_the_weights(mode):
    c = resolve_defaults(FinalizeConfig(mode=mode))
    assert (c.init, c.trainable, c.steps, c.lr) == ("rtn", "all", 200, 1e-4)


@pytest.mark.parametrize("method", ["signround", "gptq"])
def test_rounders_start_from_round_to_nearest(method):
    assert resolve_defaults(FinalizeConfig(method=method)).init == "rtn"


def test_explicit_values_are_kept_and_resolving_twice_changes_nothing():
    c = FinalizeConfig(init="gptq", steps=7, lr=3e-3, trainable="all")
    r = resolve_defaults(c)
    assert (r.init, r.mode, r.trainable, r.steps, r.lr) == ("gptq", "e2e", "all", 7, 3e-3)
    assert resolve_defaults(r) is r
    assert c.mode is None  # the caller's config is not changed
    assert set(RECIPES) == {"e2e", "tiled", "tiled+e2e"}


def test_the_finalized_plan_records_the_resolved_recipe(llama_dir):
    model = load_model(llama_dir)
    plan = uniform_plan(model, 3, 16)
    batch = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    config = FinalizeConfig(samples=4, seq_len=16, steps=2, signround_steps=2, batch_size=2, show_progress=False)
    api.finalize(model, plan, batch, config)
    info = model.bitsearch_plan.provenance["finalize"]
    assert info["init"] == "signround" and "signround" in info
    assert info["qat"]["mode"] == "e2e"
    assert info["qat"]["settings"]["trainable"] == "scales" and info["qat"]["settings"]["lr"] == 2e-5
