"""What llama.cpp calls a transformers model: architecture metadata, tensor names, q/k layout, tokenizer.

Supported: Llama, Mistral (both written as llama.cpp's ``llama`` architecture) and Qwen2 (``qwen2``).
Facts taken from llama.cpp (not its code): tensor names (``token_embd``, ``blk.N.attn_q`` ...,
``output_norm``, ``output``); its ``llama`` architecture applies RoPE to interleaved pairs, so the
q and k rows of a transformers Llama (rotate-half layout) are permuted on the way in, per head
``(2, d/2) -> (d/2, 2)``; ``qwen2`` uses the rotate-half layout as is. A permutation of rows
commutes with ggml's row-wise quantization, so quantizing before or after it stores the same
weights. The tokenizer is written from the transformers one as a byte-level BPE
(``tokenizer.ggml.model = gpt2``, ``tokenizer.ggml.pre = default``) plus the original
``tokenizer.json`` (``tokenizer.huggingface.json``), from which :mod:`bitsearch.gguf.load` rebuilds it.
"""

from __future__ import annotations

import json
import re

import numpy as np

from ..errors import BitsearchError

__all__ = [
    "ARCHES",
    "gguf_arch",
    "gguf_name",
    "hf_name",
    "permute_rows",
    "unpermute_rows",
    "rope_permuted",
    "add_architecture",
    "add_tokenizer",
]

#: transformers model_type -> llama.cpp architecture
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTES = {"llama": True, "qwen2": False}

_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GG_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_arch(config) -> str:
    arch = ARCHES.get(getattr(config, "model_type", None))
    if arch is None:
        raise BitsearchError(
            f"GGUF export supports model types {', '.join(sorted(ARCHES))}, not '{getattr(config, 'model_type', None)}'"
        )
    return arch


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a transformers parameter (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``); a module name stands for its weight."""
    if not hf.endswith((".weight", ".bias")):
        hf += ".weight"
    m = _HF_BLOCK_RE.match(hf)
    if m and m.group(2) in _BLOCK:
        out = f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    else:
        base, kind = hf.rsplit(".", 1)
        if base not in _TOP:
            raise BitsearchError(f"tensor '{hf}' has no llama.cpp name (unsupported layer)")
        out = f"{_TOP[base]}.{kind}"
    return out


def hf_name(gg: str) -> str:
    """The transformers parameter name of a llama.cpp tensor name."""
    m = _GG_BLOCK_RE.match(gg)
    if m and m.group(2) in _BLOCK_BACK:
        return f"model.layers.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}.{m.group(3)}"
    base, kind = gg.rsplit(".", 1)
    if base not in _TOP_BACK:
        raise BitsearchError(f"GGUF tensor '{gg}' has no transformers counterpart")
    return f"{_TOP_BACK[base]}.{kind}"


def rope_permuted(config, hf: str) -> int | None:
    """Heads to permute ``hf``'s rows by for llama.cpp (None: stored as is)."""
    if not _PERMUTES[gguf_arch(config)]:
        return None
    if ".self_attn.q_proj." in hf:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half rows -> llama.cpp's interleaved rows (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if kind not in ("default", None):
        raise BitsearchError(f"GGUF export does not write RoPE scaling '{kind}'")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def add_architecture(writer, config, name: str) -> None:
    """The architecture metadata llama.cpp reads for a Llama/Mistral/Qwen2 config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise BitsearchError(f"GGUF export supports the silu MLP, not '{config.hidden_act}'")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A transformers byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer metadata."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise BitsearchError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise BitsearchError(
            "GGUF export writes byte-level BPE tokenizers only "
            f"(this one is {model.get('type')} with pre-tokenizer {pre[:60]})"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for tok in spec.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        special[tok["id"]] = bool(tok.get("special"))
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (3 if special[i] else 4) if i in special else 1  # CONTROL, USER_DEFINED, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(int(tid))
    probe = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(False)
    writer.add_string("tokenizer.huggingface.json", backend.to_str())
