"""bitsearch's packed checkpoint: write one (atomically, exactly the plan's bytes of quantized
tensors), load one back without ever building the targets' float weights, and count its bytes.

Packed checkpoint directory::

    bitsearch_quant.json     format, version, group size, target layers, plan summary, aliases
    quantized.safetensors    per target: qbits, codes_b{w}, scales_b{w}, zeros_b{w}, weight_f16
    model.safetensors        every other tensor of the model, untouched (target biases included)
    config.json, tokenizer   so ``bitsearch eval`` and generation run from the folder

The bytes of ``quantized.safetensors``' tensors equal the plan's predicted bytes exactly.
With coupled pruning the producers' pruned rows and the consumers' freed columns are gone from
the packed model (smaller matrices; its outputs equal the fake-quantized, masked model's).
``save_fake`` instead writes a plain HF checkpoint whose target weights are dequantized values.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_dir
from ..couplings import couplings_from_list, physical_layout
from ..errors import BitsearchError
from ..models import tied_linears
from ..packed import PackedEmbedding, PackedLinear, PackedRows, PackedTiedHead, pack_module
from ..quantize import set_module
from .plan import BitPlan

__all__ = [
    "PACKED_CONFIG",
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "save_packed",
    "save_fake",
    "load_packed",
    "packed_tensor_bytes",
    "parameters_on_meta",
]

PACKED_CONFIG = "bitsearch_quant.json"
PACKED_FORMAT = "bitsearch-packed"
PACKED_VERSION = 1
QUANT_FILE = "quantized.safetensors"
REST_FILE = "model.safetensors"


def packed_tensor_bytes(path: str) -> int:
    """Bytes of the quantized tensors stored in a packed checkpoint (headers excluded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(path, QUANT_FILE), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
    return total


def save_packed(model: nn.Module, plan: BitPlan, out: str, tokenizer=None) -> int:
    """Write a packed checkpoint of ``model`` under ``plan`` to ``out``; the model is not changed.

    Returns the bytes of the quantized tensors. The folder appears only when complete.
    """
    from safetensors.torch import save_file

    modules = dict(model.named_modules())
    rows, columns = physical_layout(plan.couplings, plan.bits)
    quant, layers = {}, {}
    skip = set(plan.bits)  # modules whose weight is stored packed (targets and their tied heads)
    for name, bits in plan.bits.items():
        mod = modules[name]
        heads = (
            tied_linears(model, name)
            if isinstance(mod, nn.Embedding)
            else tuple(n for n, m in modules.items() if isinstance(m, PackedTiedHead) and m._embedding is mod)
        )
        skip.update(heads)
        if not isinstance(mod, PackedRows):
            mod = pack_module(
                mod, torch.as_tensor(bits), plan.group_size, rows=rows.get(name), columns=columns.get(name)
            )
        for k, v in mod.packed_tensors().items():
            quant[f"{name}.{k}"] = v.detach().cpu().contiguous()
        layers[name] = {
            "in_features": mod.in_features,
            "out_features": mod.n_rows,
            "kind": mod.kind,
            "bias": getattr(mod, "bias", None) is not None,
            "padding_idx": getattr(mod, "padding_idx", None),
            "tied": list(heads),
        }
    rest, aliases, seen = {}, {}, {}
    for k, v in model.state_dict(keep_vars=False).items():
        if k.rsplit(".", 1)[0] in skip and not k.endswith(".bias"):  # a target's weight or packed buffers
            continue
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        rest[k] = v.detach().cpu().contiguous()
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "package_version": __version__,
        "group_size": plan.group_size,
        "layers": layers,
        "aliases": aliases,
        "dtype": str(next(iter(rest.values())).dtype).replace("torch.", "") if rest else "float32",
        "plan_summary": plan.summary,
        "model": plan.model,
        "plan_provenance": plan.provenance,
        "couplings": [c.to_dict() for c in plan.couplings],
    }
    with atomic_dir(out) as tmp:
        save_file(quant, os.path.join(tmp, QUANT_FILE))
        save_file(rest, os.path.join(tmp, REST_FILE))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, PACKED_CONFIG), "w") as f:
            json.dump(meta, f, indent=1)
    return sum(t.numel() * t.element_size() for t in quant.values())


def save_fake(model: nn.Module, out: str, tokenizer=None) -> None:
    """Write ``model`` (fake-quantized in place) as a plain HF checkpoint."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules whose parameters live on the meta device (no memory, no initialisation),
    while buffers (e.g. rotary frequencies, which no checkpoint stores) are computed for real.
    Patches ``nn.Module.register_parameter`` while open: every thread's new modules are affected."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, PACKED_CONFIG)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsearchError(f"packed checkpoint '{path}' has an unreadable {PACKED_CONFIG}: {exc}") from None
    if meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
        raise BitsearchError(
            f"'{path}' is a {meta.get('format')} v{meta.get('version')} checkpoint; "
            f"this bitsearch reads {PACKED_FORMAT} v{PACKED_VERSION}"
        )
    return meta


def load_packed(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A model whose targets are :class:`PackedLinear` modules, from a packed checkpoint.

    The model is built on the meta device, so the targets' float weights never exist: only the
    packed tensors and the untouched tensors are allocated. Untouched floating-point tensors keep
    the dtype they were saved in unless ``dtype`` is given; the packed layers compute in that dtype.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = _read_meta(path)
    try:
        quant = load_file(os.path.join(path, QUANT_FILE))
        rest = load_file(os.path.join(path, REST_FILE))
    except Exception as exc:
        raise BitsearchError(f"packed checkpoint '{path}' is incomplete or corrupt: {exc}") from None
    if dtype is None:
        dtype = next((t.dtype for t in rest.values() if t.is_floating_point()), torch.float32)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    packed_embedding_tied = False
    bits = {k[: -len(".qbits")]: v.numpy() for k, v in quant.items() if k.endswith(".qbits")}
    keep_rows, _ = physical_layout(couplings_from_list(meta.get("couplings")), bits)
    for name, info in meta["layers"].items():
        prefix = name + "."
        tensors = {k[len(prefix) :]: v for k, v in quant.items() if k.startswith(prefix)}
        if info.get("kind") == "embedding":
            new = PackedEmbedding(
                info["in_features"],
                info["out_features"],
                meta["group_size"],
                tensors,
                info.get("padding_idx"),
                compute_dtype=dtype,
            )
            for h in info.get("tied", []):
                set_module(model, h, PackedTiedHead(new, rest.get(h + ".bias")))
                packed_embedding_tied = True
        else:
            new = PackedLinear(
                info["in_features"],
                info["out_features"],
                meta["group_size"],
                tensors,
                rest.get(prefix + "bias"),
                compute_dtype=dtype,
                rows=keep_rows.get(name),
            )
        set_module(model, name, new)
    for alias, target in meta.get("aliases", {}).items():
        rest[alias] = rest[target]
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and not packed_embedding_tied:
        model.tie_weights()
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing or unexpected:
        raise BitsearchError(
            f"packed checkpoint '{path}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device)
    model.eval()
    return model
