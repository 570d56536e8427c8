"""GGUF plans and export, checked with llama.cpp itself (llama-cpp-python) and the gguf package.

Tiny Llama / Qwen2 / Mistral models with rows of 256 and 512 weights (so every K-quant and IQ type
applies) are searched, exported, loaded by llama.cpp, and compared with bitsearch's dequantized
model of the same plan. Skips without the ``gguf`` extra.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from bitsearch import api  # noqa: E402
from bitsearch.cli import main  # noqa: E402
from bitsearch.config import EvalConfig, ExportConfig, SearchConfig, SensitivityConfig  # noqa: E402
from bitsearch.errors import BitsearchError  # noqa: E402
from bitsearch.export.gguf import plan_imatrix, tensor_type_lines  # noqa: E402
from bitsearch.gguf.arch import gguf_name  # noqa: E402
from bitsearch.gguf.imatrix import Imatrix, read_imatrix, write_imatrix  # noqa: E402
from bitsearch.gguf.load import dequantized_model, load_gguf  # noqa: E402
from bitsearch.gguf.plan import TensorPlan  # noqa: E402
from bitsearch.gguf.quantize import dequantize, quantize, round_trip  # noqa: E402
from bitsearch.gguf.runtime import LlamaCpp, llama_quantize  # noqa: E402
from bitsearch.gguf.search import gguf_targets  # noqa: E402
from bitsearch.gguf.types import GGML_TYPES, SEARCH_TYPES  # noqa: E402
from bitsearch.inputs import load_plan  # noqa: E402


def _gguf_config(arch: str, vocab: int):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=256,
    )
    extra = {
        "llama": dict(tie_word_embeddings=True),
        "qwen2": dict(tie_word_embeddings=False),
        "mistral": dict(sliding_window=None, tie_word_embeddings=False),
    }[arch]
    return AutoConfig.for_model(arch, **common, **extra)


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for i, arch in enumerate(("llama", "qwen2", "mistral")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_gguf_config(arch, len(tok)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.06)
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
        d = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def exported(gguf_models, text_file, tmp_path_factory) -> dict[str, dict]:
    """Per architecture: a plan at 4.0 bits per weight and its GGUF export."""
    out = {}
    for arch, d in gguf_models.items():
        root = tmp_path_factory.mktemp(f"{arch}-gguf")
        plan_path, gguf_path = str(root / "plan.json"), str(root / "model.gguf")
        if arch == "llama":  # through the command line
            assert (
                main(
                    [
                        "search",
                        "--format",
                        "gguf",
                        "--model",
                        d,
                        "--budget",
                        "4.0",
                        "--out",
                        plan_path,
                        "--calib",
                        text_file,
                        "--samples",
                        "8",
                        "--seq-len",
                        "64",
                        "--calib-loss-samples",
                        "4",
                        "--quiet",
                    ]
                )
                == 0
            )
            assert (
                main(["export", "--model", d, "--plan", plan_path, "--format", "gguf", "--out", gguf_path, "--quiet"])
                == 0
            )
        else:
            api.search(
                d,
                text_file,
                SearchConfig(
                    format="gguf", budget="4.0", samples=8, seq_len=64, loss_calibration_samples=4, show_progress=False
                ),
                out=plan_path,
            )
        info = (
            {
                "bytes": planned_bytes(gguf_path),
                "tensor_type_file": gguf_path + ".tensor-types.txt",
                "imatrix": gguf_path + ".imatrix.gguf",
            }
            if arch == "llama"
            else api.export(d, plan_path, gguf_path, ExportConfig(format="gguf"))
        )
        plan = load_plan(plan_path)
        out[arch] = {"dir": d, "plan": plan, "plan_path": plan_path, "gguf": gguf_path, "info": info}
    return out


def planned_bytes(path: str) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2)


def _ids(d: str, text_file: str, n: int = 48) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    return tok(open(text_file).read()[:2000])["input_ids"][:n]


# ---- llama.cpp's quantizers ------------------------------------------------------------------


def test_quantizer_is_bit_exact_with_gguf_py_and_dequantizers_agree():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 1, (8, 1))).astype(np.float32)
    for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        ours = quantize(w, t)
        ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[t])
        assert ours.tobytes() == np.asarray(ref).tobytes(), t
    imat = rng.uniform(0.1, 2.0, 512).astype(np.float32)
    for t in SEARCH_TYPES + ["IQ4_NL", "Q4_0", "F16"]:
        data = quantize(w, t, imat)
        assert data.nbytes == 8 * 512 // GGML_TYPES[t].block * GGML_TYPES[t].type_size
        ours = dequantize(data, t, w.shape)
        ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[t])
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7, err_msg=t)
        err = float(((ours - w) ** 2).mean())
        assert err < float((w**2).mean()) * (0.2 if t.startswith("IQ2") else 0.1), t


def test_imatrix_changes_the_quantization_as_llama_cpp_weighs_it():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    imat = np.ones(256, dtype=np.float32)
    imat[:32] = 100.0
    plain, weighted = round_trip(w, "Q3_K", np.ones(256, np.float32)), round_trip(w, "Q3_K", imat)
    # the heavy columns come out closer when weighted
    assert ((weighted - w)[:, :32] ** 2).sum() < ((plain - w)[:, :32] ** 2).sum()
    with pytest.raises(BitsearchError, match="only with an importance matrix"):
        quantize(w, "IQ2_XXS")


# ---- imatrix files ---------------------------------------------------------------------------


def _legacy(path, entries, tail=True):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (mean, ncall) in entries.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, mean.size))
            f.write((mean * ncall).astype(np.float32).tobytes())
        if tail:
            f.write(struct.pack("<i", 7) + struct.pack("<i", 4) + b"wiki")


def test_imatrix_gguf_round_trip_is_lossless(tmp_path):
    rng = np.random.default_rng(2)
    imat = Imatrix(
        {
            "blk.0.attn_q.weight": (rng.uniform(0, 50, 256).astype(np.float32), 4096),
            "output.weight": (rng.uniform(0, 9, 512).astype(np.float32), 17),
        },
        ["heldout.txt"],
        chunk_count=8,
        chunk_size=512,
    )
    path = str(tmp_path / "im.gguf")
    write_imatrix(imat, path)
    back = read_imatrix(path)
    assert back.datasets == imat.datasets and (back.chunk_count, back.chunk_size) == (8, 512)
    assert set(back.entries) == set(imat.entries)
    for k, (s, c) in imat.entries.items():
        assert back.entries[k][1] == c
        assert back.entries[k][0].tobytes() == s.tobytes()
    legacy = str(tmp_path / "im.dat")
    mean = rng.uniform(0, 3, 256).astype(np.float32)
    _legacy(legacy, {"blk.1.ffn_up.weight": (mean, 10)})
    lg = read_imatrix(legacy)
    np.testing.assert_allclose(lg.mean("blk.1.ffn_up.weight"), mean, rtol=1e-6)
    assert lg.chunk_count == 7 and lg.datasets == ["wiki"]


def test_malformed_imatrix_files_get_one_line(tmp_path):
    good = str(tmp_path / "good.gguf")
    write_imatrix(Imatrix({"a.weight": (np.ones(4, np.float32), 3)}), good)
    blob = open(good, "rb").read()
    cases = {
        "truncated.gguf": blob[: len(blob) // 2],
        "garbage.dat": b"\x00\x10\xff" * 50,
        "empty.dat": b"",
        "bad-name.dat": struct.pack("<ii", 1, 10**6) + b"x" * 20,
    }
    w = gguf.GGUFWriter(str(tmp_path / "model-like.gguf"), arch="llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in list(cases) + ["model-like.gguf", "missing.gguf"]:
        with pytest.raises(BitsearchError) as err:
            read_imatrix(str(tmp_path / name))
        assert "\n" not in str(err.value) and "imatrix file" in str(err.value), name


# ---- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_exported_file_runs_in_llama_cpp_like_the_dequantized_model(exported, text_file, arch):
    e = exported[arch]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e["dir"], dtype=torch.float32).eval()
    plan = load_plan(e["plan_path"])
    assert isinstance(plan, TensorPlan)
    # bytes: the plan's prediction is the file's planned tensor data, tensor by tensor
    r = gguf.GGUFReader(e["gguf"])
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    targets = gguf_targets(model)
    assert sum(sizes[gguf_name(t.name)] for t in targets) == plan.summary["bytes"] == e["info"]["bytes"]
    assert len(set(plan.types.values())) > 1  # a mix, not one type
    ids = _ids(e["dir"], text_file)
    deq = dequantized_model(model, plan, plan_imatrix(plan))
    with torch.no_grad():
        ours = deq(torch.tensor([ids])).logits[0].numpy()
        flt = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(e["gguf"], n_ctx=64) as llm:
        theirs = llm.logits(ids)
    diff = np.abs(theirs - ours).max()
    # llama.cpp multiplies with 8-bit-quantized activations: close to, not equal to, float math on
    # the same dequantized weights, and much closer to it than to the float model
    assert diff < 0.05 * np.abs(ours).max()
    assert diff < 0.25 * np.abs(flt - ours).max()
    # bitsearch's reader (gguf package dequantizers) rebuilds the same model
    back, tok = load_gguf(e["gguf"])
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor([ids])).logits[0].numpy(), ours, rtol=1e-4, atol=1e-4)
    assert tok(open(text_file).read()[:2000])["input_ids"][: len(ids)] == ids


def test_tensor_type_file_and_imatrix_reproduce_the_file_with_llama_quantize(exported, tmp_path):
    e = exported["llama"]
    plan = e["plan"]
    lines = open(e["info"]["tensor_type_file"]).read().split()
    assert lines == tensor_type_lines(plan)
    # an F32 GGUF of the same model, then llama.cpp's own quantizer driven by the two files
    f32 = TensorPlan(model=plan.model, types={k: "F32" for k in plan.types}, menu=["F32"])
    f32.fill_summary()
    f32_plan = str(tmp_path / "f32.json")
    f32.save(f32_plan)
    api.export(e["dir"], f32_plan, str(tmp_path / "f32.gguf"), ExportConfig(format="gguf"))
    overrides = [tuple(line.rsplit("=", 1)) for line in lines]
    out = str(tmp_path / "llama-quantize.gguf")
    llama_quantize(
        str(tmp_path / "f32.gguf"), out, "Q8_0", overrides=overrides, imatrix=read_imatrix(e["info"]["imatrix"])
    )
    ours = {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in gguf.GGUFReader(e["gguf"]).tensors}
    theirs = {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in gguf.GGUFReader(out).tensors}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], name


def test_per_channel_plan_is_refused_in_one_line(exported, tmp_path, capsys):
    from bitsearch.io.plan import BitPlan

    e = exported["llama"]
    model_targets = json.load(open(e["plan_path"]))["model"]["targets"]
    bits = {k: np.full(v[0], 4, np.uint8) for k, v in model_targets.items() if "layers" in k}
    shapes = {k: v for k, v in model_targets.items() if k in bits}
    p = BitPlan(model={"model_type": "llama", "sha256": "x", "targets": shapes}, group_size=128, menu=[4], bits=bits)
    p.fill_summary()
    path = str(tmp_path / "channel.json")
    p.save(path)
    rc = main(["export", "--model", e["dir"], "--plan", path, "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "search --format gguf" in err
    assert not os.path.exists(tmp_path / "x.gguf")


def test_eval_of_a_gguf_file_matches_the_dequantized_model(exported, text_file):
    e = exported["qwen2"]
    cfg = EvalConfig(max_tokens=512, seq_len=128, show_progress=False)
    r = api.evaluate(e["gguf"], text_file, cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(e["dir"], dtype=torch.float32).eval()
    deq = dequantized_model(model, e["plan"], plan_imatrix(load_plan(e["plan_path"])))
    ref = api.evaluate(deq, text_file, cfg, tokenizer=AutoTokenizer.from_pretrained(e["dir"]))
    assert abs(r.ppl - ref.ppl) < 1e-3 * ref.ppl


def test_sensitivity_reads_a_llama_cpp_imatrix(exported, text_file, tmp_path):
    e = exported["mistral"]
    cfg = SensitivityConfig(
        samples=8, seq_len=64, bits="2,4", group_size=64, loss_calibration="none", show_progress=False
    )
    collected = api.sensitivity(e["dir"], text_file, cfg)
    from_file = api.sensitivity(e["dir"], text_file, cfg, imatrix=e["info"]["imatrix"])
    cols = ["imatrix.e2", "imatrix.e4"]
    np.testing.assert_allclose(from_file.df[cols].to_numpy(), collected.df[cols].to_numpy(), rtol=1e-4)
    assert from_file.meta["calibration_data"]["imatrix"] == e["info"]["imatrix"]
    bad = tmp_path / "other.gguf"
    write_imatrix(Imatrix({"blk.0.attn_q.weight": (np.ones(7, np.float32), 1)}), str(bad))
    with pytest.raises(BitsearchError, match="has no entry for target|values for a tensor"):
        api.sensitivity(e["dir"], text_file, cfg, imatrix=str(bad))


def test_plans_fit_the_budget_with_types_the_rows_allow(exported):
    for e in exported.values():
        plan = e["plan"]
        for name, t in plan.types.items():
            assert plan.model["targets"][name][1] % GGML_TYPES[t].block == 0
        assert 3.9 < plan.summary["avg_bits"] <= 4.0
