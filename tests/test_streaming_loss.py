"""BlockRunner's loss: the output embedding and cross-entropy over chunks of tokens give the
whole model's summed next-token NLL, in every tested family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS

from bitsearch import blocks as streaming
from bitsearch.blocks import BlockRunner
from bitsearch.io.loading import load_model


def whole_model_nll(m, x) -> float:
    with torch.no_grad():
        logits = m(input_ids=x, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_equals_whole_logits(arch, tiny_models, monkeypatch):
    m = load_model(tiny_models[arch])
    x = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    want = whole_model_nll(m, x)
    for elements in (1, 7 * m.get_output_embeddings().out_features, 1 << 21):  # 1 token, 7, all at once
        monkeypatch.setattr(streaming, "_HEAD_CHUNK_ELEMENTS", elements)
        runner = BlockRunner(m)
        assert runner.nll_from(0, [runner.capture(x)[0]], [runner.capture(x)[1]], [x]) == pytest.approx(want, rel=1e-5)
        assert runner._head_ok is True


def test_model_whose_logits_are_not_the_heads_output_falls_back(llama_dir):
    """A model that scales its logits after the output embedding: the runner notices on its first
    call and uses the model's own logits."""
    m = load_model(llama_dir)
    forward = m.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    m.forward = scaled
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    want = whole_model_nll(m, x)
    runner = BlockRunner(m)
    h, kw = runner.capture(x)
    assert runner.nll_from(0, [h], [kw], [x]) == pytest.approx(want, rel=1e-5)
    assert runner._head_ok is False
