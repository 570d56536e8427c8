"""studies/confidence.py: its per-window statistics add up to bitsearch.evaluate.perplexity's
figures, and the paired window comparison recovers known differences."""

import math

import numpy as np
import pytest
import torch
from test_evaluate import Bigram

from bitsearch.evaluate import perplexity
from studies import confidence


def test_window_stats_add_up_to_perplexity_entropy_and_kl():
    model, ref = Bigram(17, 0), Bigram(17, 1)
    ids = torch.randint(0, 17, (300,), generator=torch.Generator().manual_seed(5))
    st = confidence.window_stats(model, ref, ids, 290, seq_len=32)
    r = perplexity(model, ids, 32, 290, reference=ref, show_progress=False)
    n = st["n"].sum()
    assert n == 290 - 10 and len(st["n"]) == 10  # 9 full windows of 32 and a last one of 2 tokens
    assert math.exp(st["nll"].sum() / n) == pytest.approx(r.ppl, rel=1e-6)
    assert st["entropy"].sum() / n == pytest.approx(r.entropy, rel=1e-6)
    assert st["kl"].sum() / n == pytest.approx(r.kl, rel=1e-6)


def test_paired_difference_and_its_standard_error():
    rng = np.random.default_rng(0)
    n = np.full(50, 100.0)
    a = {"n": n, "nll": rng.normal(500, 20, 50)}
    assert confidence.paired(a, a, "nll") == (0.0, 0.0)
    shifted = {"n": n, "nll": a["nll"] - 0.03 * n}  # 0.03 nats less per token in every window
    mean, se = confidence.paired(a, shifted, "nll")
    assert mean == pytest.approx(0.03) and se == pytest.approx(0.0, abs=1e-12)
    noisy = {"n": n, "nll": a["nll"] + rng.normal(0, 1.0, 50)}  # per-token difference sd 0.01 per window
    mean, se = confidence.paired(noisy, a, "nll")
    d = (noisy["nll"] - a["nll"]) / n
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(50))


def test_distance_measures_agree_with_perplexity_and_vanish_against_itself():
    model, ref = Bigram(19, 0), Bigram(19, 1)
    ids = torch.randint(0, 19, (200,), generator=torch.Generator().manual_seed(6))
    d = confidence.distance_measures(model, ref, ids, None, seq_len=40)
    r = perplexity(model, ids, 40, reference=ref, show_progress=False)
    assert d["nll"] == pytest.approx(r.nll, rel=1e-6) and d["kl_t1"] == pytest.approx(r.kl, rel=1e-6)
    assert d["reverse_kl"] > 0 and d["kl_t4"] < d["kl_t2"] < d["kl_t1"]  # softer distributions, closer
    same = confidence.distance_measures(model, model, ids, None, seq_len=40)
    assert all(abs(same[k]) < 1e-6 for k in ("kl_t1", "kl_t2", "kl_t4", "reverse_kl", "tail_nll_change"))
    everything = confidence.distance_measures(model, ref, ids, None, seq_len=40, tail=1.01)  # every token
    # float32 log-probabilities: the two ways of summing differ by rounding only
    assert everything["tail_nll_change"] == pytest.approx(
        r.nll - perplexity(ref, ids, 40, show_progress=False).nll, abs=1e-5
    )


def test_finalize_option_applies_the_benchmarks_finalizer_to_each_plan(llama_dir, text_file, tmp_path, monkeypatch):
    """--finalize signround: each plan's model is SignRound-quantized on --calib-text with the
    benchmark's --quick settings (shrunk here): every row of a 2-bit plan ends up with at most 4
    levels per group, not the float weights, and not round-to-nearest's weights."""
    from types import SimpleNamespace

    from bitsearch.io.loading import load_model, load_tokenizer
    from bitsearch.quantize import fake_quantize_model
    from bitsearch.search.uniform import uniform_plan

    small = dict(seq_len=32, samples=4, signround_steps=10, qat_steps=2, qat_lr=2e-4, qat_batch_size=2, qat_seq_len=32)
    monkeypatch.setattr(confidence, "settings", lambda quick: small)
    args = SimpleNamespace(finalize="signround", model=llama_dir, calib_text=text_file, out=str(tmp_path))
    quantize = confidence.quantizer(args, load_tokenizer(llama_dir))
    plan = uniform_plan(load_model(llama_dir, "cpu", "float32"), 2, 32)
    signround, rtn = load_model(llama_dir, "cpu", "float32"), load_model(llama_dir, "cpu", "float32")
    quantize(signround, plan)
    fake_quantize_model(rtn, plan)
    moved = 0
    for name in plan.bits:
        w, r = signround.get_submodule(name).dequantized_weight(), rtn.get_submodule(name).weight
        g = w.detach().reshape(w.shape[0], -1, 32)
        levels = max(len(torch.unique(g[i, j])) for i in range(g.shape[0]) for j in range(g.shape[1]))
        assert levels <= 4, name
        moved += int((w != r).any())
    assert moved > 0  # SignRound rounded some rows otherwise than RTN
    assert confidence.quantizer(SimpleNamespace(finalize="rtn"), None) is fake_quantize_model
