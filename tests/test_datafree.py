"""Data-free calibration (bitsearch.datafree): generation, reproducibility and the cache."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, SLM
from torch import nn

from bitsearch import datafree
from bitsearch.datafree import (
    CACHE_FORMAT,
    _choose,
    default_cache_path,
    generate_samples,
    load_or_generate,
    model_digest,
    special_token_ids,
    vocab_limit,
)
from bitsearch.errors import BitsearchError
from bitsearch.io.loading import load_model, load_tokenizer


def _nll(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir), load_tokenizer(llama_dir)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_full_recomputation(tiny_models, arch):
    m = load_model(tiny_models[arch])
    a = generate_samples(m, 3, 12, seed=1, batch_size=2, show_progress=False)
    b = generate_samples(m, 3, 12, seed=1, batch_size=2, use_cache=False, show_progress=False)
    assert a.shape == (3, 12) and a.dtype == torch.long and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < vocab_limit(m)


def test_same_seed_same_tokens_whatever_the_batching(llama):
    m, _ = llama
    a = generate_samples(m, 5, 10, seed=3, batch_size=16, show_progress=False)
    assert torch.equal(a, generate_samples(m, 5, 10, seed=3, batch_size=16, show_progress=False))
    # sample i depends on (seed, i) only: batch size, sample count, start and length don't change it
    assert torch.equal(a, generate_samples(m, 5, 10, seed=3, batch_size=2, show_progress=False))
    assert torch.equal(a[:2], generate_samples(m, 2, 10, seed=3, show_progress=False))
    assert torch.equal(a[2:], generate_samples(m, 3, 10, seed=3, start=2, show_progress=False))
    assert torch.equal(a[:, :6], generate_samples(m, 5, 6, seed=3, show_progress=False))
    assert not torch.equal(a, generate_samples(m, 5, 10, seed=4, show_progress=False))


def test_first_token_is_uniform_over_allowed_ids_and_never_special(llama):
    m, tok = llama
    special = special_token_ids(tok)
    assert special == [tok.eos_token_id]
    first = generate_samples(m, 400, 2, vocab_exclude=special, show_progress=False)[:, 0]
    assert not set(first.tolist()) & set(special)
    assert len(set(first.tolist())) > 150  # spread over the vocabulary (320 ids)
    only = generate_samples(
        m, 40, 2, vocab_exclude=[i for i in range(len(tok)) if i not in (5, 7)], show_progress=False
    )[:, 0]
    assert set(only.tolist()) == {5, 7}
    with pytest.raises(BitsearchError, match="excluded"):
        generate_samples(m, 1, 2, vocab_exclude=range(len(tok)), show_progress=False)


def test_special_token_ids_include_added_special_tokens(llama_dir):
    tok = load_tokenizer(llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    tok.add_tokens(["plainword"])
    ids = special_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|x|>") in ids and tok.eos_token_id in ids
    assert tok.convert_tokens_to_ids("plainword") not in ids


def test_greedy_segment_is_the_argmax_and_sampling_stays_in_top_k(llama):
    m, _ = llama
    g = 4
    x = generate_samples(m, 6, 14, seed=2, greedy_tokens=g, top_k=5, show_progress=False)
    with torch.no_grad():
        logits = m(x).logits
    assert torch.equal(x[:, 1 : g + 1], logits[:, :g].argmax(-1))
    top5 = logits[:, g:-1].topk(5, dim=-1).indices
    assert (top5 == x[:, g + 1 :].unsqueeze(-1)).any(-1).all()
    assert not torch.equal(x[:, g + 1 :], logits[:, g:-1].argmax(-1))  # it does sample
    # temperature 0 and top-1 are greedy throughout
    for kw in ({"temperature": 0.0}, {"top_k": 1}):
        y = generate_samples(m, 3, 10, greedy_tokens=0, show_progress=False, **kw)
        with torch.no_grad():
            assert torch.equal(y[:, 1:], m(y).logits[:, :-1].argmax(-1))


def test_inverse_cdf_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, float("-inf"), 0.0, 1.0, float("-inf")]]).expand(40000, -1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    picks = _choose(logits, u, greedy=False, temperature=1.0, top_k=None)
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    assert freq[1] == 0 and freq[4] == 0  # masked ids never drawn
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.01)
    hot = _choose(logits, u, greedy=False, temperature=0.5, top_k=2)
    assert set(hot.unique().tolist()) == {0, 3}
    assert (hot == 0).float().mean() == pytest.approx(torch.softmax(torch.tensor([4.0, 2.0]), -1)[0].item(), abs=0.01)


def test_vocab_size_caps_every_position(llama):
    m, _ = llama
    x = generate_samples(m, 8, 12, vocab_size=50, show_progress=False)
    assert int(x.max()) < 50


def test_settings_are_checked_and_training_mode_restored(llama):
    m, _ = llama
    for kw, msg in [
        ({"n_samples": 0}, "samples"),
        ({"seq_len": 1}, "seq_len"),
        ({"seq_len": 10**6}, "positions"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top.k"),
        ({"batch_size": 0}, "batch"),
    ]:
        args = {"n_samples": 2, "seq_len": 8} | kw
        with pytest.raises(BitsearchError, match=msg):
            generate_samples(m, args.pop("n_samples"), args.pop("seq_len"), show_progress=False, **args)
    m.train()
    try:
        generate_samples(m, 2, 6, show_progress=False)
        assert m.training
    finally:
        m.eval()


class _NoCache(nn.Module):
    """A causal LM that keeps no KV cache (returns past_key_values=None)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls: list[int] = []

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        self.calls.append(input_ids.shape[1])
        return SimpleNamespace(logits=self.inner(input_ids, use_cache=False).logits, past_key_values=None)


def test_falls_back_to_recomputation_without_a_kv_cache(llama):
    m, _ = llama
    wrapped = _NoCache(m)
    x = generate_samples(wrapped, 3, 9, seed=5, show_progress=False)
    assert torch.equal(x, generate_samples(m, 3, 9, seed=5, show_progress=False))
    assert wrapped.calls == list(range(1, 9))  # whole prefixes after the first step


def test_samples_are_likely_under_their_model(llama):
    m, _ = llama
    x = generate_samples(m, 8, 32, show_progress=False)
    u = torch.randint(0, vocab_limit(m), x.shape, generator=torch.Generator().manual_seed(0))
    assert _nll(m, x) < _nll(m, u) - 0.5


@pytest.mark.shared
def test_slm_samples_beat_uniform_tokens():
    """On the trained fixture the samples' NLL (about 3.9 nats) is near the real text's (4.5), far
    below uniform tokens' (12.5)."""
    m, tok = load_model(SLM), load_tokenizer(SLM)
    x = generate_samples(m, 4, 64, vocab_exclude=special_token_ids(tok), show_progress=False)
    u = torch.randint(0, vocab_limit(m, tok), x.shape, generator=torch.Generator().manual_seed(0))
    nll_x, nll_u = _nll(m, x), _nll(m, u)
    assert nll_x < 6.0 and nll_u > 10.0


# --------------------------------------------------------------------------- cache


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_cache_round_trip_and_spec(llama, tmp_path):
    m, tok = llama
    path = str(tmp_path / "calib.pt")
    a, spec = load_or_generate(m, tok, 4, 10, path, seed=7, show_progress=False)
    assert spec["cache"]["status"] == "generated" and _files(tmp_path) == ["calib.pt"]
    assert {k: spec[k] for k in ("source", "samples", "seq_len", "seed")} == {
        "source": "data-free",
        "samples": 4,
        "seq_len": 10,
        "seed": 7,
    }
    assert spec["generation"]["vocab_exclude"] == [tok.eos_token_id]
    assert spec["model"] == model_digest(m)
    assert torch.equal(
        a,
        generate_samples(m, 4, 10, seed=7, vocab_exclude=[tok.eos_token_id], vocab_size=len(tok), show_progress=False),
    )
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == CACHE_FORMAT and obj["version"] == 1 and torch.equal(obj["tokens"], a)
    assert obj["meta"]["samples"] == 4 and obj["meta"]["tokens_sha256"] == spec["tokens_sha256"]
    mtime = os.stat(path).st_mtime_ns
    b, spec2 = load_or_generate(m, tok, 4, 10, path, seed=7, show_progress=False)
    assert torch.equal(a, b) and spec2["cache"]["status"] == "hit" and os.stat(path).st_mtime_ns == mtime
    assert {k: v for k, v in spec2.items() if k != "cache"} == {k: v for k, v in spec.items() if k != "cache"}
    c, spec3 = load_or_generate(m, tok, 4, 10, None, seed=7, show_progress=False)
    assert torch.equal(a, c) and spec3["cache"] == {"path": None, "status": "none"}


def test_cache_prefix_reuse_and_extension(llama, tmp_path):
    m, tok = llama
    path = str(tmp_path / "calib.pt")
    full, _ = load_or_generate(m, tok, 6, 12, path, show_progress=False)
    part, spec = load_or_generate(m, tok, 3, 8, path, show_progress=False)
    assert spec["cache"]["status"] == "hit" and torch.equal(part, full[:3, :8])
    assert torch.equal(part, load_or_generate(m, tok, 3, 8, None, show_progress=False)[0])
    assert torch.load(path, weights_only=True)["tokens"].shape == (6, 12)  # not shrunk
    msgs: list[str] = []
    more, spec = load_or_generate(m, tok, 9, 12, path, show_progress=False, log=msgs.append)
    assert spec["cache"]["status"] == "extended" and "3 more" in msgs[0]
    assert torch.equal(more[:6], full)
    assert torch.equal(more, load_or_generate(m, tok, 9, 12, None, show_progress=False)[0])
    longer, spec = load_or_generate(m, tok, 2, 16, path, show_progress=False)
    assert spec["cache"]["status"] == "generated"
    cached = torch.load(path, weights_only=True)["tokens"]
    assert cached.shape == (9, 16) and torch.equal(cached[:, :12], more) and torch.equal(longer, cached[:2])


def test_cache_of_other_settings_or_model_is_refused_unless_overwrite(tiny_models, llama, tmp_path):
    m, tok = llama
    path = str(tmp_path / "calib.pt")
    a, _ = load_or_generate(m, tok, 2, 8, path, show_progress=False)
    with pytest.raises(BitsearchError, match="seed 0 != 1"):
        load_or_generate(m, tok, 2, 8, path, seed=1, show_progress=False)
    with pytest.raises(BitsearchError, match="temperature 1.0 != 0.7"):
        load_or_generate(m, tok, 2, 8, path, temperature=0.7, show_progress=False)
    with pytest.raises(BitsearchError, match="greedy_tokens"):
        load_or_generate(m, tok, 2, 8, path, greedy_tokens=0, show_progress=False)
    with pytest.raises(BitsearchError, match="another model: config differs"):
        load_or_generate(load_model(tiny_models["qwen2"]), tok, 2, 8, path, show_progress=False)
    other = load_model(tiny_models["llama"])
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(BitsearchError, match="another model: weights differ") as err:
        load_or_generate(other, tok, 2, 8, path, show_progress=False)
    assert "\n" not in str(err.value) and path in str(err.value)
    b, spec = load_or_generate(other, tok, 2, 8, path, overwrite=True, show_progress=False)
    assert spec["cache"]["status"] == "generated"
    assert torch.load(path, weights_only=True)["meta"]["model"] == model_digest(other)
    assert load_or_generate(other, tok, 2, 8, path, show_progress=False)[1]["cache"]["status"] == "hit"


def test_not_a_cache_file_is_refused(llama, tmp_path):
    m, tok = llama
    junk = tmp_path / "junk.pt"
    junk.write_text("not torch")
    with pytest.raises(BitsearchError, match="cannot be read"):
        load_or_generate(m, tok, 2, 8, str(junk), show_progress=False)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(BitsearchError, match="not a bitsearch data-free cache"):
        load_or_generate(m, tok, 2, 8, str(other), show_progress=False)
    _, spec = load_or_generate(m, tok, 2, 8, str(other), overwrite=True, show_progress=False)
    assert spec["cache"]["status"] == "generated"


def test_digest_ignores_dtype(llama_dir, llama):
    m, _ = llama
    assert model_digest(load_model(llama_dir, dtype="bfloat16")) == model_digest(load_model(llama_dir))
    assert model_digest(m) == model_digest(load_model(llama_dir))


def test_write_is_atomic(llama, tmp_path, monkeypatch):
    m, tok = llama
    path = str(tmp_path / "calib.pt")
    real_save = torch.save

    def half_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(datafree.torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        load_or_generate(m, tok, 2, 8, path, show_progress=False)
    assert _files(tmp_path) == []
    monkeypatch.setattr(datafree.torch, "save", real_save)
    a, _ = load_or_generate(m, tok, 2, 8, path, show_progress=False)
    # an interrupted extension leaves the old cache as it was
    monkeypatch.setattr(datafree.torch, "save", half_save)
    with pytest.raises(OSError):
        load_or_generate(m, tok, 4, 8, path, show_progress=False)
    monkeypatch.setattr(datafree.torch, "save", real_save)
    assert _files(tmp_path) == ["calib.pt"] and torch.equal(torch.load(path, weights_only=True)["tokens"], a)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datafree, "generate_samples", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_or_generate(m, tok, 2, 8, str(tmp_path / "new.pt"), show_progress=False)
    assert _files(tmp_path) == ["calib.pt"]


def test_default_cache_path_is_shared_by_a_run_folder(llama, tiny_models, tmp_path):
    m, _ = llama
    digest = model_digest(m)["weights_sha256"][:12]
    path = default_cache_path(str(tmp_path / "plan.json"), m)
    assert path == str(tmp_path / f"datafree-{digest}-s0.pt")
    assert default_cache_path(str(tmp_path / "table.parquet"), m) == path
    assert default_cache_path(str(tmp_path / "ckpt") + "/", m, seed=3) == str(tmp_path / f"datafree-{digest}-s3.pt")
    assert default_cache_path(str(tmp_path / "plan.json"), load_model(tiny_models["qwen2"])) != path
