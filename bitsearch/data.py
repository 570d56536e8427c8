"""Calibration data: N samples x L tokens, seeded, shared by every stage.

Sources: a local text file, or ``hf:NAME[:CONFIG]:SPLIT`` through the optional ``datasets``
library (its "text" column). The text is tokenized once, then N windows of L tokens start at
seeded random offsets (distinct when the text is long enough).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

import torch

from .errors import BitsearchError

__all__ = ["CalibSpec", "read_text", "tokenize_text", "calibration_batches"]


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration tokens came from (recorded in plans and tables)."""

    source: str
    samples: int
    seq_len: int
    seed: int
    text_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def _read_hf(spec: str) -> str:
    parts = spec[3:].split(":")
    if len(parts) == 2:
        name, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise BitsearchError(f"calibration '{spec}' must look like hf:NAME[:CONFIG]:SPLIT")
    try:
        import datasets  # optional extra
    except ImportError:
        raise BitsearchError("hf: calibration needs the 'datasets' package: pip install 'bitsearch[hf]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown dataset, bad split: all one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BitsearchError(f"cannot load dataset '{spec}': {first}") from None
    if "text" not in ds.column_names:
        raise BitsearchError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def read_text(source: str) -> str:
    """The text of a file (``.xz`` read with lzma) or of an ``hf:`` dataset."""
    if source.startswith("hf:"):
        return _read_hf(source)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise BitsearchError(f"text file '{source}' does not exist")
    try:
        if path.endswith(".xz"):
            import lzma

            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise BitsearchError(f"cannot read text file '{source}': {exc}") from None


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer,
    source: str | list[str],
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    allow_overlap: bool = False,
) -> tuple[torch.Tensor, CalibSpec]:
    """(samples, seq_len) token windows at seeded offsets of a text file (or of a list of texts,
    joined by blank lines), and their :class:`CalibSpec`. Windows never overlap unless
    ``allow_overlap``: a text too short for that is refused, saying how many windows fit."""
    if samples < 1:
        raise BitsearchError(f"samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise BitsearchError(f"seq_len must be at least 2 (got {seq_len})")
    if isinstance(source, str):
        text = read_text(source)
    else:
        text, source = "\n\n".join(source), f"{len(source)} texts"
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise BitsearchError(f"calibration text '{source}' has {ids.numel()} tokens, fewer than seq_len {seq_len}")
    n_starts = ids.numel() - seq_len + 1
    g = torch.Generator().manual_seed(seed)
    if n_starts >= samples * seq_len:
        # non-overlapping: pick distinct slots of seq_len tokens
        slots = torch.randperm(n_starts // seq_len, generator=g)[:samples]
        starts = slots * seq_len
    elif not allow_overlap:
        fit = n_starts // seq_len
        raise BitsearchError(
            f"calibration text '{source}' has {ids.numel()} tokens: {fit} windows of {seq_len} "
            f"fit without overlap, {samples} asked; use `samples` {fit} or fewer (or allow_overlap)"
        )
    else:
        starts = torch.randint(0, n_starts, (samples,), generator=g)
    batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    spec = CalibSpec(
        source=source,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_sha256=hashlib.sha256(text.encode()).hexdigest()[:16],
    )
    return batch, spec
