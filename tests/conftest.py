"""Shared fixtures: tiny random models of five families, a tiny tokenizer, a small text.

Run the fast suite with ``pytest -m "not slow"``; the whole suite with ``pytest``.
Tests that need ``../shared`` are marked ``shared`` and skip when it is absent.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
SLM = os.path.join(SHARED, "models", "slm-llama-17m")
CORPUS = os.path.join(SHARED, "data", "corpus")

ARCHS = ["llama", "qwen2", "mistral", "gpt_neox", "opt"]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "in the old town square and every evening the river carries songs from distant hills"
).split()


def make_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(12)) + ".")
    return "\n".join(lines) + "\n"


def tiny_config(arch: str, vocab: int):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    if arch == "llama":
        return AutoConfig.for_model("llama", num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return AutoConfig.for_model("mistral", num_key_value_heads=2, sliding_window=None, **common)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **common)
    if arch == "opt":
        return AutoConfig.for_model(
            "opt",
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(make_text())
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, text_file) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([text_file], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return str(out)


def build_tiny_model(arch: str, out_dir: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Save a tiny random model of ``arch`` with the test tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab=len(tok))
    model = AutoModelForCausalLM.from_config(cfg)
    # larger-than-init weights so quantization visibly changes the outputs
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {a: build_tiny_model(a, str(root / a), tokenizer_dir) for a in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> str:
    return tiny_models["llama"]


def pytest_collection_modifyitems(config, items):
    have_shared = os.path.isdir(SLM)
    have_gpu = torch.cuda.is_available()
    for item in items:
        if "shared" in item.keywords and not have_shared:
            item.add_marker(pytest.mark.skip(reason=f"fixtures not found at {SHARED}"))
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
