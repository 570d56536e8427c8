"""Reading a target's block index and layer type from its module name (for plots and for the
search knobs that act per block or per layer type)."""

from __future__ import annotations

import re

__all__ = ["layer_block_and_type", "layer_types"]

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")


def layer_block_and_type(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, "q_proj"); ``transformer.h.0.attn.c_attn`` ->
    (0, "c_attn"); ``lm_head`` -> (None, "lm_head"); ``model.embed_tokens`` -> (None, "embed_tokens")."""
    m = _BLOCK_RE.search(name)
    block = int(m.group(1)) if m else None
    return block, name.rsplit(".", 1)[-1]


def layer_types(layers: list[str]) -> dict[str, tuple[int | None, str]]:
    """Block and type per layer; a type that two modules of one block share (GPT-2's attn.c_proj
    and mlp.c_proj) is disambiguated with its parent module's name."""
    parsed = {name: layer_block_and_type(name) for name in layers}
    seen: dict[tuple, set] = {}
    for name, key in parsed.items():
        seen.setdefault(key, set()).add(name)
    clash = {t for (b, t), names in seen.items() if len(names) > 1}
    out = {}
    for name, (b, t) in parsed.items():
        if t in clash:
            parts = name.split(".")
            t = ".".join(parts[-2:]) if len(parts) > 1 else t
        out[name] = (b, t)
    return out
