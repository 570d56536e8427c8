"""Loading models and tokenizers: a Hugging Face hub id or folder, or a bitsearch packed checkpoint
(recognised by its ``bitsearch_quant.json``), on a device and in a dtype; one-line errors."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import BitsearchError
from .checkpoint import PACKED_CONFIG

__all__ = ["DTYPES", "load_model", "load_tokenizer", "resolve_dtype", "resolve_device"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise BitsearchError(f"unknown dtype '{dtype}' (choose from {', '.join(sorted(set(DTYPES)))})") from None


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BitsearchError(f"unknown device '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BitsearchError(f"device '{device}' asked for, but no CUDA device is available")
    return dev


def _is_local(name: str) -> bool:
    return os.path.isdir(name) or name.startswith((".", "/", "~"))


def load_model(
    name_or_path: str,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
) -> nn.Module:
    """A causal LM from a hub id, a local HF directory or a bitsearch packed checkpoint.

    ``dtype=None``: float32 for a HF model, the saved dtype of a packed checkpoint's untouched tensors."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    if os.path.isfile(os.path.join(name_or_path, PACKED_CONFIG)):
        from .checkpoint import load_packed

        return load_packed(name_or_path, device=device, dtype=None if dtype is None else resolve_dtype(dtype))
    torch_dtype = resolve_dtype(dtype or "float32")
    if _is_local(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise BitsearchError(f"model directory '{name_or_path}' does not exist")
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitsearchError(f"cannot load model '{name_or_path}': {first}") from None
    model.to(dev)
    model.eval()
    return model


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitsearchError(f"cannot load the tokenizer of '{name_or_path}': {first}") from None
