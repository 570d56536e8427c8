"""Embedding and lm_head targets (untied model): a channel of an embedding is one token's row."""

import numpy as np
import pytest
import torch

from bitsearch import api
from bitsearch.config import SearchConfig, SensitivityConfig
from bitsearch.errors import BitsearchError
from bitsearch.io.checkpoint import load_packed, packed_tensor_bytes
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets
from bitsearch.quant import fake_quantize
from bitsearch.quantize import fake_quantize_model

SMALL = dict(samples=4, seq_len=32, group_size=16, loss_calibration_samples=2, show_progress=False)
TARGETS = r"embed_tokens|lm_head|layers\.0\.mlp"


def test_embedding_rows_weighted_by_token_frequency(tiny_models, text_file):
    model = tiny_models["qwen2"]  # untied embeddings
    m = load_model(model)
    targets = find_targets(m, targets=TARGETS)
    kinds = {t.name: t.kind for t in targets}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
    table = api.sensitivity(
        model,
        text_file,
        SensitivityConfig(targets=TARGETS, estimators="imatrix,snr", bits="0,2,4", loss_calibration="none", **SMALL),
    )
    from bitsearch.data import calibration_batches
    from bitsearch.io.loading import load_tokenizer

    batch, _ = calibration_batches(load_tokenizer(model), text_file, 4, 32, 0)
    freq = torch.bincount(batch.reshape(-1), minlength=m.config.vocab_size).double() / batch.numel()
    w = m.get_submodule("model.embed_tokens").weight.detach()
    rows = table.df["layer"] == "model.embed_tokens"
    d = (w - fake_quantize(w, 2, 16)).double()
    expect = freq.numpy() * d.pow(2).sum(1).numpy()
    np.testing.assert_allclose(table.df.loc[rows, "imatrix.e2"].to_numpy(), expect, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(table.df.loc[rows, "snr.e2"].to_numpy(), expect, rtol=1e-6, atol=1e-15)
    unseen = (freq == 0).numpy()
    assert unseen.any() and (table.df.loc[rows, "imatrix.e2"].to_numpy()[unseen] == 0).all()


def test_embedding_plan_applies_and_packs(tiny_models, text_file, tmp_path):
    model = tiny_models["qwen2"]
    # the exact per-layer calibration: on this random model the one-pass prediction ranks layers differently
    plan = api.search(
        model,
        text_file,
        SearchConfig(budget="6", targets=TARGETS, loss_calibration="layer-loss", **SMALL),
        out=str(tmp_path / "p.json"),
    )
    emb_bits = plan.bits["model.embed_tokens"]
    assert len(np.unique(emb_bits)) > 1  # tokens get different widths
    api.apply(model, str(tmp_path / "p.json"), out=str(tmp_path / "packed"))
    assert plan.summary["bytes"] == packed_tensor_bytes(str(tmp_path / "packed"))
    packed = load_packed(str(tmp_path / "packed"))
    fake = fake_quantize_model(load_model(model), plan)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=x).logits, fake(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_tied_lm_head_alone_is_refused_with_a_hint(llama_dir):
    with pytest.raises(BitsearchError, match="target the embedding instead"):
        find_targets(load_model(llama_dir), targets="lm_head")


def test_tied_embedding_counts_both_uses_and_packs_once(llama_dir, text_file, tmp_path):
    """Targeting a tied embedding quantizes the lm_head with it: the input-estimator curves add
    the head's output error to the embedding's; the packed checkpoint stores the rows once."""
    m = load_model(llama_dir)
    targets = find_targets(m, targets=r"embed_tokens|lm_head|layers\.1\.mlp")
    emb = next(t for t in targets if t.kind == "embedding")
    assert emb.tied == ("lm_head",) and "lm_head" not in {t.name for t in targets}
    table = api.sensitivity(
        llama_dir,
        text_file,
        SensitivityConfig(
            targets="embed_tokens|layers\\.1\\.mlp",
            estimators="imatrix,snr",
            bits="0,2,4",
            loss_calibration="none",
            **SMALL,
        ),
    )
    from bitsearch.data import calibration_batches
    from bitsearch.io.loading import load_tokenizer

    batch, _ = calibration_batches(load_tokenizer(llama_dir), text_file, 4, 32, 0)
    freq = torch.bincount(batch.reshape(-1), minlength=m.config.vocab_size).double() / batch.numel()
    seen = []
    h = m.lm_head.register_forward_hook(lambda mod, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(input_ids=batch)
    h.remove()
    x = torch.cat(seen).double()
    w = m.get_submodule("model.embed_tokens").weight.detach()
    d = (w - fake_quantize(w, 2, 16)).double()
    rows = table.df["layer"] == "model.embed_tokens"
    expect_snr = freq.numpy() * d.pow(2).sum(1).numpy() + (x @ d.T).pow(2).mean(0).numpy()
    np.testing.assert_allclose(table.df.loc[rows, "snr.e2"].to_numpy(), expect_snr, rtol=1e-5)
    expect_im = freq.numpy() * d.pow(2).sum(1).numpy() + (d.pow(2) * x.pow(2).mean(0)).sum(1).numpy()
    np.testing.assert_allclose(table.df.loc[rows, "imatrix.e2"].to_numpy(), expect_im, rtol=1e-5)

    plan = api.search(
        llama_dir,
        text_file,
        SearchConfig(budget="6", targets="embed_tokens|layers\\.1\\.mlp", **SMALL),
        out=str(tmp_path / "p.json"),
    )
    api.apply(llama_dir, str(tmp_path / "p.json"), out=str(tmp_path / "packed"))
    assert plan.summary["bytes"] == packed_tensor_bytes(str(tmp_path / "packed"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(("lm_head", "model.embed_tokens"))]
    packed = load_packed(str(tmp_path / "packed"))
    fake = fake_quantize_model(load_model(llama_dir), plan)
    assert torch.equal(fake.lm_head.weight, fake.model.embed_tokens.weight)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=x).logits, fake(input_ids=x).logits, atol=1e-4, rtol=1e-4)
