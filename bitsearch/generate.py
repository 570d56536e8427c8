"""Batch-1 greedy generation with a key-value cache, timed: prefill (the prompt in one forward)
and decoding (one forward per new token) separately.

Works for any causal LM: a float Hugging Face model or a packed checkpoint (whose layers then
run the packed kernels). :func:`greedy_decode` is the timed loop; with ``forced`` it feeds given
tokens instead of its own choices, so that two models can be timed on the same tokens.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config import GenerateConfig
from .errors import BitsearchError

__all__ = ["GenerateResult", "DecodeTiming", "greedy_decode", "generate"]


@dataclass
class DecodeTiming:
    tokens: list[int]  # the new tokens (the first one comes from the prefill)
    choices: list[int]  # the model's argmax at each step (= tokens unless forced)
    prefill_seconds: float  # the prompt's forward pass (wall clock)
    decode_seconds: float  # the forward passes of the tokens after the first (wall clock)
    prefill_cpu_seconds: float  # the same in CPU time of this process (all its threads), which
    decode_cpu_seconds: float  # other jobs on a shared machine do not inflate

    @property
    def decode_tokens_per_s(self) -> float:
        return self._rate(self.decode_seconds)

    @property
    def decode_tokens_per_cpu_s(self) -> float:
        return self._rate(self.decode_cpu_seconds)

    def _rate(self, seconds: float) -> float:
        steps = len(self.tokens) - 1
        return steps / seconds if steps > 0 and seconds > 0 else float("nan")


@dataclass
class GenerateResult:
    text: str  # the generated continuation (prompt excluded)
    prompt_tokens: int
    timing: DecodeTiming

    @property
    def tokens_per_s(self) -> float:
        return self.timing.decode_tokens_per_s


def _cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the key-value cache (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    forced: torch.Tensor | None = None,
    eos_token_id: int | None = None,
) -> DecodeTiming:
    """Greedy decoding of ``new_tokens`` after ``input_ids`` (1, L), batch 1, with a cache.

    ``forced`` (new_tokens,): feed these tokens instead of the argmax (the work is the same for
    every model). Stops early at ``eos_token_id`` (never when ``forced`` is given)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise BitsearchError("greedy_decode: input_ids must have shape (1, L)")
    if new_tokens < 1:
        raise BitsearchError(f"max_new_tokens must be at least 1 (got {new_tokens})")
    key = _cache_keyword(model)
    device = next(iter(model.parameters()), torch.empty(0)).device
    ids = input_ids.to(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(input_ids=ids, use_cache=True)
    choice = out.logits[:, -1].argmax(-1)
    token = choice if forced is None else forced[:1].to(device)
    prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens, choices = [int(token)], [int(choice)]
    cache = getattr(out, key)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1, new_tokens):
        if forced is None and eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        out = model(input_ids=token.view(1, 1), use_cache=True, **{key: cache})
        cache = getattr(out, key)
        choice = out.logits[:, -1].argmax(-1)
        token = choice if forced is None else forced[i : i + 1].to(device)
        tokens.append(int(token))
        choices.append(int(choice))
    return DecodeTiming(tokens, choices, prefill, time.perf_counter() - t0, prefill_cpu, time.process_time() - c0)


def generate(model, prompt: str, config: GenerateConfig | None = None, *, tokenizer=None) -> GenerateResult:
    """Greedy batch-1 generation from ``prompt``; ``model`` an ``nn.Module`` or a folder / hub id
    (a HF model or a packed checkpoint)."""
    from .inputs import resolve_model, set_threads

    config = config or GenerateConfig()
    set_threads(config)
    if config.max_new_tokens < 1:
        raise BitsearchError(f"max_new_tokens must be at least 1 (got {config.max_new_tokens})")
    loaded = resolve_model(model, config, tokenizer)
    tok = loaded.tok()
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise BitsearchError("the prompt has no tokens")
    eos = tok.eos_token_id if config.stop_at_eos else None
    timing = greedy_decode(loaded.model, ids, config.max_new_tokens, eos_token_id=eos)
    return GenerateResult(tok.decode(timing.tokens, skip_special_tokens=True), int(ids.shape[1]), timing)
