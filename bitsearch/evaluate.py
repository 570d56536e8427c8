"""Perplexity and KL divergence on a text, over non-overlapping windows.

The text's first ``max_tokens`` tokens are cut into consecutive windows of ``seq_len`` tokens
(the last one shorter when ``seq_len`` does not divide them); a window of n tokens predicts its
last n - 1 tokens from its own prefix.

    nll = mean over predicted tokens of -log p(token | window prefix),  ppl = exp(nll)
    KL(reference || model) = mean over predicted positions of
                             sum_v p_ref(v) (log p_ref(v) - log p_model(v))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BitsearchError
from .progress import progress

__all__ = ["EvalResult", "windows", "batch_nll", "perplexity"]


@dataclass
class EvalResult:
    ppl: float
    nll: float
    tokens: int
    seq_len: int
    model: str
    kl: float | None = None
    reference: str | None = None
    entropy: float | None = None  # mean entropy of the model's next-token distribution (nats)

    def to_dict(self) -> dict:
        d = {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "seq_len": self.seq_len, "model": self.model}
        if self.entropy is not None:
            d["entropy"] = self.entropy
        if self.kl is not None:
            d["kl"] = self.kl
            d["reference"] = self.reference
        return d


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive (B, seq_len) batches of windows of the first ``max_tokens`` ids, the partial
    last window (if at least 2 tokens) as a batch of its own."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise BitsearchError(f"the text has {ids.numel()} tokens: nothing to evaluate")
    n = ids.numel() // seq_len
    out = [ids[: n * seq_len].reshape(n, seq_len)] if n else []
    rest = ids[n * seq_len :]
    if rest.numel() >= 2:
        out.append(rest.reshape(1, -1))
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_nll(model, batch: torch.Tensor, micro_batch: int = 8) -> float:
    """Mean next-token NLL of ``model`` over a (B, L) batch."""
    dev = _device_of(model)
    total, count = 0.0, 0
    for i in range(0, batch.shape[0], micro_batch):
        x = batch[i : i + micro_batch].to(dev)
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = x[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    return total / count


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seq_len: int = 512,
    max_tokens: int | None = None,
    micro_batch: int = 4,
    reference=None,
    name: str = "",
    reference_name: str | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Perplexity, the mean entropy of the predictions (how confident the model is, whatever the
    next token) and, when ``reference`` is given, KL(reference || model), on the token ids of a text."""
    dev = _device_of(model)
    nll_sum, kl_sum, ent_sum, count, n_tokens = 0.0, 0.0, 0.0, 0, 0
    chunks = [
        w[i : i + micro_batch] for w in windows(ids, seq_len, max_tokens) for i in range(0, w.shape[0], micro_batch)
    ]
    for x in progress(chunks, desc=f"eval {name}".strip(), enable=show_progress):
        x = x.to(dev)
        n_tokens += x.numel()
        logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
        tgt = x[:, 1:]
        nll_sum += -logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        ent_sum += -(logp.exp() * logp).sum().item()
        count += tgt.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference(input_ids=x.to(_device_of(reference))).logits[:, :-1].float(), dim=-1)
            ref_logp = ref_logp.to(logp.device)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
    nll = nll_sum / count
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=n_tokens,
        seq_len=seq_len,
        model=name,
        kl=(kl_sum / count) if reference is not None else None,
        reference=reference_name,
        entropy=ent_sum / count,
    )
