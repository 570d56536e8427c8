"""GGUF files back into transformers models, and the dequantized model a per-tensor plan stands for.

:func:`load_gguf` rebuilds a Llama/Mistral (``llama``) or Qwen2 (``qwen2``) GGUF as a transformers
model whose weights are the file's tensors dequantized by the ``gguf`` package (rows of q/k put back
in the rotate-half layout), with the tokenizer from the file's ``tokenizer.huggingface.json``; this
is how ``bitsearch eval --model FILE.gguf`` scores a file next to llama.cpp.
:func:`dequantized_model` applies a plan's llama.cpp round trips to a model in memory (what the
exported file computes with).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import BitsearchError
from .arch import gguf_name, hf_name, unpermute_rows
from .imatrix import Imatrix
from .plan import TensorPlan
from .quantize import round_trip
from .search import gguf_targets, imatrix_for

__all__ = ["load_gguf", "dequantized_model"]

_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError, struct.error, ...
        raise BitsearchError(
            f"'{path}' is not a readable GGUF file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _fields(r) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def load_gguf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file bitsearch can read (dequantized weights)."""
    import transformers
    from gguf.quants import dequantize
    from tokenizers import Tokenizer

    r = _reader(path)
    kv = _fields(r)
    arch = kv.get("general.architecture")
    if arch not in _CONFIGS:
        raise BitsearchError(
            f"'{path}' is a GGUF of architecture '{arch}'; bitsearch reads {', '.join(sorted(_CONFIGS))}"
        )
    names = {t.name for t in r.tensors}

    def key(k, default=None):
        v = kv.get(f"{arch}.{k}", default)
        if v is None:
            raise BitsearchError(f"'{path}' lacks the metadata key {arch}.{k}")
        return v

    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    hidden = int(key("embedding_length"))
    vocab = next(t for t in r.tensors if t.name == "token_embd.weight").shape[1]
    cfg = getattr(transformers, _CONFIGS[arch])(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in names,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        hidden_act="silu",
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {}
    for t in r.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_rows(w, heads if ".attn_q." in t.name else kv_heads)
        state[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise BitsearchError(
            f"'{path}' does not hold a complete {arch} model "
            f"({'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]})"
        )
    model.tie_weights()
    model.eval()
    tok_json = kv.get("tokenizer.huggingface.json")
    if tok_json is None:
        raise BitsearchError(
            f"'{path}' has no tokenizer.huggingface.json metadata (files bitsearch exports do): "
            f"bitsearch cannot rebuild its tokenizer"
        )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    for attr, k in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        if k in r.fields and tokens is not None:
            setattr(tok, attr, tokens.contents()[int(r.fields[k].contents())])
    return model, tok


@torch.no_grad()
def dequantized_model(model: nn.Module, plan: TensorPlan, imatrix: Imatrix | None) -> nn.Module:
    """A copy of ``model`` whose plan targets hold llama.cpp's round trip in the plan's types."""
    out = copy.deepcopy(model)
    for t in gguf_targets(out):
        if t.name not in plan.types:
            raise BitsearchError(f"the plan has no type for '{gguf_name(t.name)}'")
        w = out.get_submodule(t.name).weight
        q = round_trip(w.detach().float().cpu().numpy(), plan.types[t.name], imatrix_for(imatrix, t))
        w.copy_(torch.from_numpy(q).to(w.dtype))
    return out
