"""GGUF for llama.cpp: every tensor of a per-tensor plan quantized by llama.cpp's own quantizer.

Writes ``out`` (the model: architecture and tokenizer metadata, the plan's tensors in their ggml
types with the plan's importance matrix, norms and biases in F32) and beside it
``<out>.tensor-types.txt`` (the plan as ``llama-quantize --tensor-type-file``: one
``^name$=TYPE`` per tensor) and ``<out>.imatrix.gguf`` (the importance matrix as a llama.cpp imatrix
file), so a user's own ``llama-quantize`` can make the same file from an F32/F16 GGUF. The targets'
tensor data in the file is exactly the plan's predicted bytes.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
from torch import nn

from ..errors import BitsearchError
from ..gguf.arch import add_architecture, add_tokenizer, gguf_arch, gguf_name, permute_rows, rope_permuted
from ..gguf.imatrix import Imatrix, read_imatrix, write_imatrix
from ..gguf.plan import TensorPlan
from ..gguf.quantize import quantize
from ..gguf.search import gguf_targets, imatrix_for
from ..gguf.types import ggml_type
from ..models import model_fingerprint
from .base import Exporter, register_exporter

__all__ = ["GGUFExporter", "plan_imatrix", "tensor_type_lines"]


def plan_imatrix(plan: TensorPlan) -> Imatrix | None:
    """The importance matrix a plan was scored with (checked against the digest the plan records)."""
    path = plan.imatrix_path()
    if path is None:
        return None
    if not os.path.isfile(path):
        raise BitsearchError(f"the plan's imatrix file '{path}' is missing (it is written beside the plan)")
    if plan.imatrix_sha256:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != plan.imatrix_sha256:
            raise BitsearchError(f"the imatrix file '{path}' is not the one the plan was made with")
    return read_imatrix(path)


def tensor_type_lines(plan: TensorPlan) -> list[str]:
    """The plan as ``llama-quantize --tensor-type-file`` entries (regexes anchored on GGUF names)."""
    return [f"^{re.escape(gguf_name(name))}$={t}" for name, t in plan.types.items()]


@register_exporter
class GGUFExporter(Exporter):
    name = "gguf"
    description = "GGUF file for llama.cpp (per-tensor ggml types from `bitsearch search --format gguf`)"
    plan_unit = "tensor"
    writes = "file"
    requires = ("gguf", "llama_cpp")

    def export(self, model: nn.Module, tokenizer, plan, out: str) -> dict:
        import gguf

        if not isinstance(plan, TensorPlan):
            raise BitsearchError(
                "--format gguf stores one ggml type per tensor and this plan is per channel: "
                "make a per-tensor plan with `bitsearch search --format gguf`"
            )
        arch = gguf_arch(model.config)
        targets = gguf_targets(model)
        plan.check_model(model_fingerprint(model, targets))
        imat = plan_imatrix(plan)
        by_name = {t.name: t for t in targets}
        tmp = f"{out}.tmp{os.getpid()}"
        writer = gguf.GGUFWriter(tmp, arch=arch)
        written = 0
        try:
            add_architecture(writer, model.config, str(getattr(model.config, "_name_or_path", "") or "bitsearch"))
            add_tokenizer(writer, tokenizer, model.config.vocab_size)
            for pname, p in model.named_parameters():
                module = pname.rsplit(".", 1)[0]
                w = p.detach().float().cpu().numpy()
                heads = rope_permuted(model.config, pname)
                if heads is not None:
                    w = permute_rows(w, heads)
                if module in by_name and pname.endswith(".weight"):
                    t = ggml_type(plan.types[module])
                    data = quantize(w, t.name, imatrix_for(imat, by_name[module]))
                    written += data.nbytes
                    writer.add_tensor(gguf_name(pname), data, raw_dtype=gguf.GGMLQuantizationType(t.id))
                elif w.ndim == 1:
                    writer.add_tensor(gguf_name(pname), np.ascontiguousarray(w, dtype=np.float32))
                else:
                    raise BitsearchError(f"the plan has no type for the weight matrix '{pname}'")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if written != plan.n_bytes():
            os.remove(tmp)
            raise BitsearchError(f"wrote {written} bytes of plan tensors but the plan predicts {plan.n_bytes()}")
        os.replace(tmp, out)
        types_file = f"{out}.tensor-types.txt"
        with open(types_file, "w", encoding="utf-8") as f:
            f.write("\n".join(tensor_type_lines(plan)) + "\n")
        info = {
            "out": out,
            "bytes": written,
            "plan_bytes": plan.n_bytes(),
            "file_bytes": os.path.getsize(out),
            "tensor_type_file": types_file,
            "imatrix": None,
        }
        if imat is not None:
            info["imatrix"] = f"{out}.imatrix.gguf"
            write_imatrix(imat, info["imatrix"])
        return info
