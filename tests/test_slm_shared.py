"""On the trained slm-llama-17m fixture (skips without ../shared): a reduced version of the
README's results, small enough for CI. The full figures come from studies/slm_budget_table.py."""

import copy

import numpy as np
import pytest
from conftest import CORPUS, SLM

from bitsearch import api
from bitsearch.config import SearchConfig, SensitivityConfig
from bitsearch.data import read_text, tokenize_text
from bitsearch.evaluate import perplexity
from bitsearch.io.checkpoint import packed_tensor_bytes
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.search import build_problem

pytestmark = pytest.mark.shared


def test_reference_perplexity_matches_fixture_readme():
    """Float32, 512-token windows, first 40,000 tokens of wikitext2_test: the fixture says 223.7."""
    m, tok = load_model(SLM), load_tokenizer(SLM)
    ids = tokenize_text(tok, read_text(f"{CORPUS}/wikitext2_test.txt"))
    r = perplexity(m, ids, 512, 40000, show_progress=False)
    assert r.ppl == pytest.approx(223.7, abs=0.1)


def test_searched_plan_at_2_5_bits_beats_uniform_2_bit(tmp_path):
    m, tok = load_model(SLM), load_tokenizer(SLM)
    table = api.sensitivity(
        m,
        f"{CORPUS}/heldout.txt",
        SensitivityConfig(samples=8, seq_len=256, bits="2,3,4,5,6,8", loss_calibration_samples=4, show_progress=False),
        tokenizer=tok,
    )
    targets = find_targets(m)
    fp = model_fingerprint(m, targets)
    ids = tokenize_text(tok, read_text(f"{CORPUS}/wikitext2_test.txt"))
    problem = build_problem(table, targets)
    w2_bytes = problem.bytes_of(np.full(problem.n_channels, problem.bits.index(2)))
    results = {}
    for method, budget in [("uniform", f"{w2_bytes}B"), ("greedy", "2.5")]:
        plan = api.search_plan(table, targets, fp, SearchConfig(budget=budget, method=method))
        api.apply(copy.deepcopy(m), plan, out=str(tmp_path / method), tokenizer=tok)
        assert packed_tensor_bytes(str(tmp_path / method)) == plan.summary["bytes"] <= plan.provenance["budget_bytes"]
        packed = load_model(str(tmp_path / method))
        results[method] = perplexity(packed, ids, 512, 4096, show_progress=False).ppl
    assert results["greedy"] < 0.9 * results["uniform"], results


def test_every_estimator_scores_every_channel_and_its_plan_applies(tmp_path, capsys):
    """The CLI with all four estimators on the SLM (reduced calibration): a finite value for
    each of the 31,744 channels from each estimator, and each estimator's plan applies."""
    from bitsearch.cli import main
    from bitsearch.sensitivity import SensitivityTable

    table = str(tmp_path / "t.parquet")
    assert (
        main(
            [
                "--quiet",
                "sensitivity",
                "--model",
                SLM,
                "--calib",
                f"{CORPUS}/heldout.txt",
                "--samples",
                "4",
                "--seq-len",
                "128",
                "--micro-batch",
                "2",
                "--probes",
                "2",
                "--calib-loss-samples",
                "2",
                "--bits",
                "0,2,3,4,8",
                "--estimators",
                "imatrix,hutchinson,fisher,snr",
                "--out",
                table,
            ]
        )
        == 0
    )
    t = SensitivityTable.load(table)
    assert len(t.df) == 31744
    for est in t.estimators:
        assert np.isfinite(t.curves(mix=est)).all(), est
        plan = str(tmp_path / f"{est}.json")
        assert (
            main(
                [
                    "--quiet",
                    "search",
                    "--model",
                    SLM,
                    "--sensitivity",
                    table,
                    "--mix",
                    est,
                    "--budget",
                    "2.5",
                    "--out",
                    plan,
                ]
            )
            == 0
        )
        assert main(["--quiet", "apply", "--model", SLM, "--plan", plan, "--out", str(tmp_path / est)]) == 0
    out = capsys.readouterr().out
    assert out.count("bytes of packed target tensors") == 4
