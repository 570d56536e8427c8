"""The Python API on in-memory models: the same plan as the CLI from the same inputs, calibration
as a file, a list of texts or token ids, and objects back instead of files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitsearch
from bitsearch.cli import main
from bitsearch.data import calibration_batches
from bitsearch.io.plan import BitPlan

OPTIONS = dict(samples=4, seq_len=32, group_size=16, loss_calibration_samples=2, show_progress=False)
FLAGS = ["--samples", "4", "--seq-len", "32", "--group-size", "16", "--loss-calibration-samples", "2"]


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir)


def same_plan(a: BitPlan, b: BitPlan) -> bool:
    return a.bits.keys() == b.bits.keys() and all(np.array_equal(a.bits[n], b.bits[n]) for n in a.bits)


def test_search_on_an_in_memory_model_equals_the_cli(hf_model, llama_dir, text_file, tmp_path):
    plan = bitsearch.search(hf_model, text_file, bitsearch.SearchConfig(budget=4.5, **OPTIONS))
    assert isinstance(plan, BitPlan) and 4.4 < plan.avg_bits <= 4.5
    assert plan.provenance["command"] == "python API"
    out = str(tmp_path / "cli.json")
    assert (
        main(["--quiet", "search", "--model", llama_dir, "--calib", text_file, "--budget", "4.5", "--out", out] + FLAGS)
        == 0
    )
    cli = BitPlan.load(out)
    assert same_plan(plan, cli) and cli.summary["bytes"] == plan.summary["bytes"]
    assert cli.provenance["command"].startswith("bitsearch --quiet search")


def test_calibration_as_texts_or_token_ids(hf_model, llama_dir, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    config = bitsearch.SearchConfig(budget="4.5", **OPTIONS)
    from_file = bitsearch.search(hf_model, text_file, config)
    texts = open(text_file).read().split("\n")
    from_texts = bitsearch.search(hf_model, texts, config, tokenizer=tok)
    ids, _ = calibration_batches(tok, text_file, 4, 32, 0)
    from_ids = bitsearch.search(hf_model, ids, config)
    assert same_plan(from_file, from_ids)  # the same windows, given as tokens
    assert from_texts.summary["bytes"] <= from_texts.provenance["budget_bytes"]
    with pytest.raises(bitsearch.BitsearchError, match="needs 4 calibration samples"):
        bitsearch.search(hf_model, ids[:2], config)
    with pytest.raises(bitsearch.BitsearchError, match="integer tensor"):
        bitsearch.search(hf_model, ids.float(), config)


def test_apply_and_evaluate_return_objects(hf_model, llama_dir, text_file, tmp_path):
    import copy

    plan = bitsearch.search(hf_model, text_file, bitsearch.SearchConfig(budget="4.5", **OPTIONS))
    packed = bitsearch.apply(copy.deepcopy(hf_model), plan)
    assert packed.bitsearch_plan is plan and not list(tmp_path.iterdir())  # nothing written
    r = bitsearch.evaluate(
        packed, text_file, bitsearch.EvalConfig(max_tokens=200, seq_len=50, show_progress=False), reference=hf_model
    )
    assert np.isfinite(r.ppl) and r.kl > 0
    ids = torch.arange(300) % 200
    r2 = bitsearch.evaluate(hf_model, ids, bitsearch.EvalConfig(max_tokens=200, seq_len=50, show_progress=False))
    assert r2.tokens == 200


def test_configs_refuse_what_the_cli_would(hf_model, text_file):
    with pytest.raises(bitsearch.BitsearchError, match="method 'magic' is not one of"):
        bitsearch.search(hf_model, text_file, bitsearch.SearchConfig(budget="3", method="magic"))
    with pytest.raises(bitsearch.BitsearchError, match="needs a budget"):
        bitsearch.search(hf_model, text_file, bitsearch.SearchConfig())
    with pytest.raises(bitsearch.BitsearchError, match="model must be an nn.Module"):
        bitsearch.search(42, text_file, bitsearch.SearchConfig(budget="3"))


def test_every_config_field_has_a_flag_and_help():
    """Options declared once: each field of each config is a flag of its command, with help text."""
    import dataclasses

    from bitsearch.cli import COMMANDS, build_parser
    from bitsearch.config import SearchConfig

    parser = build_parser()
    search = next(a for a in parser._subparsers._group_actions[0].choices["search"]._actions if a.dest == "budget")
    assert search.required
    for f in dataclasses.fields(SearchConfig):
        assert f.metadata["help"], f.name
    names = {c.name for c in COMMANDS}
    assert {"sensitivity", "search", "apply", "finalize", "eval", "export", "plot", "pareto", "demo"} <= names
