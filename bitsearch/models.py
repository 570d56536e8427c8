"""The structure of a causal LM that bitsearch works on: its decoder blocks and target layers, and
what identifies it (config, target shapes, a digest of the target weights).

A target is an ``nn.Linear`` (by default: every one inside the decoder blocks); a channel is
one output row of its weight. The decoder blocks are found structurally (the ``nn.ModuleList``
with ``config.num_hidden_layers`` entries), which covers Llama, Qwen2, Mistral, GPT-NeoX and
OPT without per-architecture tables. Embeddings / lm_head can be targeted with ``--targets``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BitsearchError

__all__ = [
    "Target",
    "decoder_blocks",
    "find_targets",
    "model_fingerprint",
    "target_of",
    "tied_linears",
    "tensor_digest",
    "check_finite",
    "max_positions",
]


@dataclass(frozen=True)
class Target:
    """One target layer: its module name and weight shape (rows = channels). ``kind`` is
    "linear" (rows = output features) or "embedding" (rows = tokens)."""

    name: str
    out_features: int
    in_features: int
    kind: str = "linear"
    #: linear modules sharing this embedding's weight (a tied lm_head): quantized with it
    tied: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, ModuleList) of the decoder blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise BitsearchError(f"cannot find the decoder blocks of a {type(model).__name__}")


def _compile(pattern: str | None, flag: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BitsearchError(f"{flag} '{pattern}' is not a valid regex: {exc}") from None


def find_targets(model: nn.Module, targets: str | None = None, exclude: str | None = None) -> list[Target]:
    """Target layers in module order.

    Default: every ``nn.Linear`` inside the decoder blocks. ``targets``: a regex searched in the
    full module name, chosen among every ``nn.Linear`` and ``nn.Embedding`` of the model (so an
    untied ``lm_head`` or the token embeddings can be added; an embedding's channel is one
    token's row). ``exclude``: a regex removing matches. A weight shared with a
    module that is not a target is refused (quantizing it would change the other module too),
    except a tied lm_head: targeting the embedding quantizes both (``Target.tied``).
    """
    inc = _compile(targets, "`targets`")
    exc = _compile(exclude, "`exclude`")
    prefix = decoder_blocks(model)[0] + "." if inc is None else ""
    kinds = (nn.Linear,) if inc is None else (nn.Linear, nn.Embedding)
    chosen: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, kinds) or not name.startswith(prefix):
            continue
        if (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue
        chosen.append((name, mod))
    if not chosen:
        conv = next(
            (n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and n.startswith(prefix)), None
        )
        if conv is not None:
            raise BitsearchError(
                f"no target layers match: this model's layers are transformers Conv1D (e.g. "
                f"'{conv}', GPT-2 style), which bitsearch does not quantize (nn.Linear and "
                f"nn.Embedding only)"
            )
        raise BitsearchError(
            "no target layers match"
            + (f" `targets` '{targets}'" if targets else "")
            + (f" `exclude` '{exclude}'" if exclude else "")
        )
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0])
    modules = dict(model.named_modules())
    names = {n for n, _ in chosen}
    out = []
    for name, mod in chosen:
        others = [o for o in owners.get(id(mod.weight), []) if o != name]
        if not others:
            out.append(target_of(name, mod))
        elif isinstance(mod, nn.Embedding) and all(isinstance(modules[o], nn.Linear) for o in others):
            out.append(target_of(name, mod, tuple(others)))  # a tied lm_head goes with its embedding
        elif isinstance(mod, nn.Linear) and any(isinstance(modules[o], nn.Embedding) for o in others):
            emb = next(o for o in others if isinstance(modules[o], nn.Embedding))
            if emb not in names:
                raise BitsearchError(
                    f"target '{name}' shares its weight with the embedding '{emb}' (tied weights): "
                    f"target the embedding instead (`targets` '{emb}'), which quantizes both, "
                    f"or exclude it with `exclude`"
                )
        else:
            raise BitsearchError(
                f"target '{name}' shares its weight with '{others[0]}' (tied weights); exclude it with `exclude`"
            )
    return out


def tied_linears(model: nn.Module, name: str) -> tuple[str, ...]:
    """Linear modules sharing the weight of module ``name`` (a tied lm_head of an embedding)."""
    w = model.get_submodule(name).weight
    return tuple(n for n, m in model.named_modules() if n != name and isinstance(m, nn.Linear) and m.weight is w)


def target_of(name: str, mod: nn.Module, tied: tuple[str, ...] = ()) -> Target:
    kind = "embedding" if isinstance(mod, nn.Embedding) else "linear"
    return Target(name, int(mod.weight.shape[0]), int(mod.weight.shape[1]), kind, tied)


_VOLATILE = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "use_cache",
    "architectures",
    "_attn_implementation",
    "_attn_implementation_internal",
    "attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_commit_hash",
    "quantization_config",
}


def tensor_digest(tensors, values: int = 4096) -> str:
    """A hash of the names, shapes and ``values`` evenly spaced values (rounded to bfloat16, so
    float32 and bfloat16 loads of one checkpoint agree) of ``tensors``: (name, tensor) pairs."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)};".encode())
            if t.is_meta or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            k = min(values, flat.numel())
            idx = torch.linspace(0, flat.numel() - 1, k, device=flat.device).round().long()
            h.update(flat[idx].float().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()


def check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not p.is_meta and not torch.isfinite(p).all():
                bad = int((~torch.isfinite(p)).sum())
                raise BitsearchError(
                    f"the model's weight '{name}' holds {bad} NaN or infinite values of "
                    f"{p.numel()}: nothing can be measured or quantized on it"
                )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None when it does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def model_fingerprint(model: nn.Module, targets: list[Target]) -> dict:
    """What identifies a model for a plan: its config (sans volatile keys), target shapes and a
    digest of the target weights (``weights_sha256``: another fine-tune of the same shapes differs)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    shapes = {t.name: [t.out_features, t.in_features] for t in targets}
    blob = json.dumps({"config": cfg, "targets": shapes}, sort_keys=True, default=str)
    cfg_blob = json.dumps(cfg, sort_keys=True, default=str)
    return {
        "model_type": cfg.get("model_type"),
        "config_sha256": hashlib.sha256(cfg_blob.encode()).hexdigest(),
        "sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "weights_sha256": tensor_digest((t.name, model.get_submodule(t.name).weight) for t in targets),
        "targets": shapes,
    }
