"""evaluate.perplexity against a direct computation: perplexity, mean predictive entropy and
KL(reference || model) over the windows of a text, the partial last window included."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bitsearch.evaluate import perplexity


class Bigram(nn.Module):
    """A model whose next-token logits depend on the current token only (a lookup table)."""

    def __init__(self, vocab: int, seed: int, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(scale * torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def direct(model, ref, ids, seq_len):
    """Every window of the text as its own sequence, every quantity summed token by token."""
    nll = ent = kl = 0.0
    n = 0
    for start in range(0, len(ids), seq_len):
        w = ids[start : start + seq_len]
        if len(w) < 2:
            continue
        for t in range(len(w) - 1):
            p = torch.softmax(model.table[w[t]].double(), -1)
            q = torch.softmax(ref.table[w[t]].double(), -1)
            nll -= math.log(p[w[t + 1]])
            ent -= float((p * p.log()).sum())
            kl += float((q * (q.log() - p.log())).sum())
            n += 1
    return math.exp(nll / n), ent / n, kl / n


@pytest.mark.parametrize("n_tokens,seq_len,micro_batch", [(97, 16, 2), (64, 16, 4), (50, 50, 1)])
def test_perplexity_entropy_and_kl_match_a_direct_computation(n_tokens, seq_len, micro_batch):
    vocab = 11
    model, ref = Bigram(vocab, 0), Bigram(vocab, 1)
    ids = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(2))
    r = perplexity(model, ids, seq_len, micro_batch=micro_batch, reference=ref, show_progress=False)
    ppl, ent, kl = direct(model, ref, ids.tolist(), seq_len)
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    assert r.entropy == pytest.approx(ent, rel=1e-5)
    assert r.kl == pytest.approx(kl, rel=1e-5)
    assert r.to_dict()["entropy"] == r.entropy


def test_entropy_is_log_vocab_for_flat_logits_and_falls_as_logits_sharpen():
    vocab = 13
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(3))
    flat = Bigram(vocab, 0, scale=0.0)
    assert perplexity(flat, ids, 20, show_progress=False).entropy == pytest.approx(math.log(vocab), rel=1e-6)
    soft, sharp = Bigram(vocab, 4, scale=1.0), Bigram(vocab, 4, scale=3.0)
    assert (
        perplexity(sharp, ids, 20, show_progress=False).entropy
        < perplexity(soft, ids, 20, show_progress=False).entropy
        < math.log(vocab)
    )
