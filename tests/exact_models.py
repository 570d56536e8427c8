"""Shared by the exact-reference tests: a tiny float64 Llama whose every op runs in float64, and
a pair of fake ranks that let one process check the distributed sum, and per-sample weight
gradients by one autograd.grad per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bitsearch.distributed import Dist


def tiny_llama(seed: int = 0, std: float = 0.5):
    """1 layer, hidden 8, vocab 32, untied, float64 (RMSNorm too, which HF runs in float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Float64RMSNorm(LlamaRMSNorm):
        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    m = m.double().eval()
    for mod in m.modules():
        if isinstance(mod, LlamaRMSNorm):
            mod.__class__ = Float64RMSNorm
    return m


@dataclass
class SendingRank(Dist):
    """Rank 0 of a fake pair: records what it would all-reduce, keeps its own partial sums."""

    sent: list = field(default_factory=list)

    def all_reduce(self, t):
        self.sent.append(t.clone())
        return t


@dataclass
class ReceivingRank(Dist):
    """Rank 1 of a fake pair: adds rank 0's partial sums, in order, as all_reduce would."""

    received: list = field(default_factory=list)

    def all_reduce(self, t):
        t += self.received.pop(0).to(t.device)
        return t


def per_sample_grads(m, targets, batch):
    """{target: (N, out, in)} gradients of each sample's summed next-token NLL, one autograd.grad each."""
    ws = [m.get_submodule(t.name).weight for t in targets]
    flags = [p.requires_grad for p in m.parameters()]
    for p in m.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    try:
        out = {t.name: [] for t in targets}
        for s in range(batch.shape[0]):
            x = batch[s : s + 1]
            logits = m(input_ids=x).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            for t, g in zip(targets, torch.autograd.grad(loss, ws)):
                out[t.name].append(g.double())
    finally:
        for p, f in zip(m.parameters(), flags):
            p.requires_grad_(f)
    return {k: torch.stack(v) for k, v in out.items()}
