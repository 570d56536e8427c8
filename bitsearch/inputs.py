"""What a stage is given, resolved: a model (an ``nn.Module``, or a folder / hub id loaded on the
configured device and dtype, checked finite), its tokenizer (found when text must be tokenized),
calibration tokens (a file, a list of texts, token ids, or data-free samples), a plan (an object
or a file), the bit menu, the CPU threads, and the command line recorded in provenance.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import __version__
from .config import CalibConfig, RunConfig
from .errors import BitsearchError

__all__ = [
    "Loaded",
    "load_plan",
    "plan_input",
    "input_paths",
    "invoked_as",
    "provenance_record",
    "note",
    "parse_bits",
    "set_threads",
    "resolve_model",
    "calibration_tokens",
]

_INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitsearch_invoked_as", default=None)


def note(message: str) -> None:
    print(f"bitsearch: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def invoked_as(command_line: str):
    """Record ``command_line`` (the CLI's) in the provenance of what is made inside the block."""
    token = _INVOKED_AS.set(command_line)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def provenance_record() -> dict:
    return {
        "command": _INVOKED_AS.get() or "python API",
        "package_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_bits(bits: str | list[int] | None) -> list[int]:
    from .sensitivity import DEFAULT_BITS, check_bits

    if bits is None:
        return list(DEFAULT_BITS)
    if isinstance(bits, str):
        try:
            bits = [int(b) for b in bits.split(",") if b.strip()]
        except ValueError:
            raise BitsearchError(f"bit menu '{bits}' must be comma-separated integers, e.g. 0,2,3,4,5,6,8") from None
    return check_bits(list(bits))


# ---- models and data ------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model, the tokenizer it came with (if any) and a name for provenance."""

    model: nn.Module
    tokenizer: object | None
    name: str

    def tok(self):
        """The tokenizer, loaded from the model's folder or hub id when not given."""
        if self.tokenizer is None:
            from .io.loading import load_tokenizer

            path = getattr(self.model, "name_or_path", "") or getattr(
                getattr(self.model, "config", None), "_name_or_path", ""
            )
            if not path:
                raise BitsearchError(
                    "text needs a tokenizer: pass tokenizer= (the model has no name_or_path to load one from)"
                )
            self.tokenizer = load_tokenizer(path)
        return self.tokenizer


def set_threads(config: RunConfig) -> None:
    if config.threads is not None:
        if config.threads < 1:
            raise BitsearchError(f"threads must be at least 1 (got {config.threads})")
        torch.set_num_threads(config.threads)


def resolve_model(model, config: RunConfig, tokenizer=None, offload: bool = False) -> Loaded:
    """``model`` as a :class:`Loaded`: an ``nn.Module`` as it is, a path or hub id loaded on
    ``config.device`` in ``config.dtype`` (with ``offload``: blocks kept on the CPU)."""
    from .io.loading import load_model, load_tokenizer
    from .models import check_finite

    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        check_finite(model)
        name = getattr(model, "name_or_path", "") or type(model).__name__
        return Loaded(model, tokenizer, str(name))
    if not isinstance(model, (str, os.PathLike)):
        raise BitsearchError(f"model must be an nn.Module or a model folder / hub id, not {type(model).__name__}")
    path = os.fspath(model)
    if path.endswith(".gguf") and os.path.isfile(path):  # dequantized through the gguf package
        from .gguf.load import load_gguf
        from .io.loading import resolve_device, resolve_dtype

        m, tok = load_gguf(path, resolve_dtype(config.dtype))
        return Loaded(m.to(resolve_device(config.device)), tokenizer or tok, path)
    if offload:
        from .blocks import offload_blocks

        m = offload_blocks(load_model(path, "cpu", config.dtype), config.device)
    else:
        m = load_model(path, config.device, config.dtype)
    check_finite(m)
    return Loaded(m, tokenizer or load_tokenizer(path), path)


def calibration_tokens(
    loaded: Loaded,
    calib,
    config: CalibConfig,
    n: int | None = None,
    *,
    out: str | None = None,
    what: str = "this stage",
) -> tuple[torch.Tensor, dict]:
    """(n, seq_len) token windows and a record of where they came from: from ``calib`` (a file,
    a list of texts, or token ids, whose first ``n`` rows are used) or, with ``config.data_free``,
    generated by the model (cached at ``config.data_free_cache`` or next to ``out``). Windows
    longer than the model's positions are refused."""
    from .data import calibration_batches
    from .models import max_positions

    n = config.samples if n is None else n
    limit = max_positions(loaded.model)

    def fits(length: int) -> None:
        if limit is not None and length > limit:
            raise BitsearchError(f"seq_len {length} exceeds the model's {limit} positions")

    if (calib is None) == (config.data_free is None):
        raise BitsearchError(
            f"{what} needs calibration data: give `calib` FILE or `data_free` N (not both; "
            f"`calib` may also be a list of texts or token ids)"
        )
    if config.data_free is not None:
        from .datafree import default_cache_path, load_or_generate

        fits(config.seq_len)
        if config.data_free < 1:
            raise BitsearchError(f"data_free {config.data_free}: the number of samples must be at least 1")
        cache = config.data_free_cache or (default_cache_path(out, loaded.model, config.seed) if out else None)
        return load_or_generate(
            loaded.model,
            loaded.tok(),
            n,
            config.seq_len,
            cache,
            seed=config.seed,
            overwrite=config.overwrite_data_free,
            show_progress=config.show_progress,
            log=lambda m: print(m, file=sys.stderr),
        )
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64) or calib.shape[1] < 2:
            raise BitsearchError(
                f"calibration token ids must be an integer tensor (samples, tokens), not "
                f"{calib.dtype} {tuple(calib.shape)}"
            )
        fits(calib.shape[1])
        if calib.shape[0] < n:
            raise BitsearchError(f"{what} needs {n} calibration samples; the token tensor has {calib.shape[0]}")
        return calib[:n].long(), {"source": "token ids", "samples": n, "seq_len": int(calib.shape[1])}
    if isinstance(calib, (list, tuple)):
        if not calib or not all(isinstance(t, str) for t in calib):
            raise BitsearchError("calibration texts must be a non-empty list of strings")
        source = list(calib)
    elif isinstance(calib, (str, os.PathLike)):
        source = os.fspath(calib)
    else:
        raise BitsearchError(
            f"calibration data must be a file, a list of texts or token ids, not {type(calib).__name__}"
        )
    batch, spec = calibration_batches(loaded.tok(), source, n, config.seq_len, config.seed, config.allow_overlap)
    fits(config.seq_len)
    return batch, spec.to_dict()


def load_plan(path: str):
    """A per-channel :class:`BitPlan` or a per-tensor ``TensorPlan`` (GGUF), by what the file holds."""
    from .gguf.plan import TensorPlan
    from .io.plan import PLAN_FORMAT, BitPlan, read_json

    d = read_json(path)
    if isinstance(d, dict) and d.get("format") == PLAN_FORMAT and d.get("unit") == "tensor":
        return TensorPlan.from_dict(d, path, path)
    return BitPlan.from_dict(d, path)


def plan_input(plan, per_tensor: bool = False):
    """A plan object from a plan or its file; a per-tensor (GGUF) plan only where ``per_tensor``."""
    from .gguf.plan import TensorPlan
    from .io.plan import BitPlan

    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(os.fspath(plan)) if per_tensor else BitPlan.load(os.fspath(plan))
    if isinstance(plan, BitPlan) or (per_tensor and isinstance(plan, TensorPlan)):
        return plan
    raise BitsearchError(f"plan must be a BitPlan or a plan file, not {type(plan).__name__}")


def input_paths(*items) -> tuple:
    """The paths among a stage's inputs (models, plans, texts, tables) that its output must spare."""
    return tuple(os.fspath(i) for i in items if isinstance(i, (str, os.PathLike)))
