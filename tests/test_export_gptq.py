"""GPTQ export, checked by the real clients: transformers (with optimum and gptqmodel) and
gptqmodel's own loader read the export in a process that never imports bitsearch, and the logits
equal bitsearch's fake-quantized model of the same plan; the packing is checked bit by bit
against a reader written here; the bytes on disk are the format's price the per-module search
budgets with.

The client tests run where ``gptqmodel`` and ``optimum`` import, or with
``BITSEARCH_GPTQ_PYTHON`` naming an interpreter that has them (docs/export.md: a side venv for a
torch that the current gptqmodel does not accept); elsewhere they skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from plans import module_plan, target_bytes

from bitsearch import api
from bitsearch.cli import main
from bitsearch.config import ExportConfig
from bitsearch.errors import BitsearchError
from bitsearch.export import get_exporter
from bitsearch.export.gptq import module_bytes
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.quant.grid import choose_qparams, quantize
from bitsearch.quantize import fake_quantize_model, pack_model
from bitsearch.search.formats import format_bytes

GS = 32
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])
# 14 targets in the tiny Llama: every width twice or more, q/k/v of layer 0 at 2, 3, 4
MIXED = [2, 3, 4, 8, 16, 3, 2]
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
BLOCK_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ + ("mlp.down_proj",)]

# runs in a fresh interpreter with the GPTQ client only; backend "gptq_torch" is gptqmodel's
# pure-torch kernel, "auto" lets it pick (on CPU also kernels that round scales to bfloat16)
LOADER = r"""
import json, sys, torch
job = json.load(open(sys.argv[1]))
ids = torch.tensor(job["ids"])
out = {}
for d, loader, backend in job["dirs"]:
    if loader == "transformers":
        from transformers import AutoModelForCausalLM, GPTQConfig
        bits = json.load(open(d + "/config.json"))["quantization_config"]["bits"]
        m = AutoModelForCausalLM.from_pretrained(d, quantization_config=GPTQConfig(bits=bits, backend=backend))
    else:
        from gptqmodel import GPTQModel
        m = GPTQModel.load(d, device="cpu", dtype=torch.float16, backend=backend).model.float()
    with torch.no_grad():
        logits = m(ids).logits.float()
    key = f"{d}.{loader}.{backend}"
    torch.save(logits, key + ".logits.pt")
    if backend == "gptq_torch":  # the weights the kernel reads, in float32 (exact: fp16 scale x int)
        weights = {n: mod.float().dequantize_weight().T for n, mod in m.named_modules() if hasattr(mod, "qweight")}
        torch.save(weights, key + ".weights.pt")
    widths = {n: int(mod.bits) for n, mod in m.named_modules() if hasattr(mod, "qweight")}
    dense = [n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear]
    kernels = sorted({type(mod).__name__ for mod in m.modules() if hasattr(mod, "qweight")})
    out[key] = {"widths": widths, "dense": dense, "kernels": kernels, "dtype": str(m.dtype)}
assert not any(k == "bitsearch" or k.startswith("bitsearch.") for k in sys.modules)
json.dump(out, open(sys.argv[2], "w"))
"""


def client_python() -> str | None:
    """An interpreter with gptqmodel and optimum: this one, or ``BITSEARCH_GPTQ_PYTHON``."""
    if all(importlib.util.find_spec(p) is not None for p in ("gptqmodel", "optimum")):
        return sys.executable
    return os.environ.get("BITSEARCH_GPTQ_PYTHON") or None


@pytest.fixture(scope="module")
def client():
    exe = client_python()
    if exe is None:
        pytest.skip("gptqmodel and optimum are not installed (or set BITSEARCH_GPTQ_PYTHON)")
    return exe


def load_in_client(exe: str, jobs: list[tuple[str, str, str]], tmp) -> dict:
    """Load each (dir, loader, backend) in a subprocess without bitsearch: by job, what it loaded
    (widths, dense modules, kernels), its logits and (pure-torch kernel) dequantized weights."""
    job, report = tmp / "job.json", tmp / "report.json"
    job.write_text(json.dumps({"dirs": jobs, "ids": IDS.tolist()}))
    script = tmp / "loader.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [exe, str(script), str(job), str(report)], cwd=str(tmp), env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    out = {}
    for job in jobs:
        key = ".".join(job)
        out[job] = rep[key]
        out[job]["logits"] = torch.load(key + ".logits.pt")
        if os.path.exists(key + ".weights.pt"):
            out[job]["weights"] = torch.load(key + ".weights.pt")
    return out


def reference_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def read_stream(words: torch.Tensor, bits: int, n: int) -> list[int]:
    """n b-bit values of a little-endian bit stream held in int32 words, one bit at a time."""
    stream = [(int(w) >> i) & 1 for w in words.tolist() for i in range(32)]
    return [sum(stream[j * bits + i] << i for i in range(bits)) for j in range(n)]


# ---- the packing, against a reader written here (no client needed)


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 16), (4, 64), (8, -1), (3, -1)])
def test_packing_read_back_bit_by_bit(tiny_models, tmp_path, bits, gs):
    from safetensors.torch import load_file

    m = load_model(tiny_models["llama"])
    plan = module_plan(m, [bits], gs)
    info = get_exporter("gptq").export(m, None, plan, str(tmp_path / "g"))
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    cfg = json.load(open(tmp_path / "g" / "config.json"))["quantization_config"]
    assert cfg["bits"] == bits and cfg["group_size"] == gs and cfg["sym"] is False and "dynamic" not in cfg
    assert cfg["checkpoint_format"] == "gptq_v2" and info["transformers_loadable"]
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = m.get_submodule(name).weight.detach()
        n_out, k = w.shape
        g = k if gs == -1 else gs
        scale, zero = choose_qparams(w, bits, gs)
        codes = quantize(w, scale, zero, bits, gs)
        qweight, qzeros = t[f"{name}.qweight"], t[f"{name}.qzeros"]
        assert qweight.dtype == qzeros.dtype == torch.int32 and qweight.shape == (-(-k * bits // 32), n_out)
        assert qzeros.shape == (k // g, -(-n_out * bits // 32))
        for col in (0, 5, n_out - 1):
            assert read_stream(qweight[:, col], bits, k) == codes[col].tolist()
        for grp in range(k // g):
            stored = read_stream(qzeros[grp], bits, n_out)
            assert stored == zero[:, grp].tolist()
        assert torch.equal(t[f"{name}.scales"], scale.t())
        assert torch.equal(t[f"{name}.g_idx"], torch.arange(k, dtype=torch.int32) // g)


def test_bytes_on_disk_are_the_formats_price(tiny_models, tmp_path):
    m = load_model(tiny_models["llama"])
    plan = module_plan(m, MIXED)
    info = get_exporter("gptq").export(m, None, plan, str(tmp_path / "g"))
    on_disk = target_bytes(str(tmp_path / "g"), plan)
    assert on_disk == info["target_bytes"] == info["predicted_target_bytes"] == format_bytes(plan, "gptq")
    by_hand = 0
    for name, b in plan.bits.items():
        n, k = plan.shapes[name]
        w = int(b[0])
        by_hand += 2 * n * k if w == 16 else 4 * n * k * w // 32 + 4 * (k // GS) * n * w // 32 + 2 * n * k // GS + 4 * k
    assert on_disk == by_hand


def test_config_names_every_exception(tiny_models, tmp_path):
    """Other widths in ``dynamic`` (exact names), dense block modules excluded both ways."""
    import re

    m = load_model(tiny_models["llama"])
    plan = module_plan(m, MIXED)
    info = get_exporter("gptq").export(m, None, plan, str(tmp_path / "g"))
    cfg = json.load(open(tmp_path / "g" / "config.json"))["quantization_config"]
    widths = {n: int(b[0]) for n, b in plan.bits.items()}
    assert not info["transformers_loadable"] and info["bits"] == cfg["bits"]
    for name, w in widths.items():
        hits = [(k, v) for k, v in cfg["dynamic"].items() if re.match(k[2:], name)]
        if w == cfg["bits"]:
            assert hits == [], name
        elif w == 16:
            assert hits == [(f"-:^{re.escape(name)}$", {})]
        else:
            assert hits == [(f"+:^{re.escape(name)}$", {"bits": w})]
    assert cfg["modules_in_block_to_quantize"] == [[n for n, w in widths.items() if w != 16]]


def test_refusals(tiny_models, tmp_path):
    m = load_model(tiny_models["llama"])
    exp = get_exporter("gptq")
    for widths, gs, match in (
        ([4, 5], GS, "not \\[5\\]"),
        ([4], 24, "group sizes"),
        ([4, 0], GS, "pruned"),
        ([16], GS, "nothing for gptq"),
    ):
        with pytest.raises(BitsearchError, match=match):
            exp.export(m, None, module_plan(m, widths, gs), str(tmp_path / "a"))
    plan = module_plan(m, [4])
    first = next(iter(plan.bits))
    plan.bits[first] = plan.bits[first].copy()
    plan.bits[first][0] = 3
    with pytest.raises(BitsearchError, match="--format gptq"):
        exp.export(m, None, plan, str(tmp_path / "a"))
    untied = load_model(tiny_models["qwen2"])
    with pytest.raises(BitsearchError, match="outside the decoder blocks"):
        exp.export(untied, None, module_plan(untied, [4], targets="proj|lm_head"), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


# ---- the real clients


@pytest.fixture(scope="module")
def exports(client, tiny_models, tmp_path_factory):
    """Exports of the tiny Llama and Qwen2 with bitsearch's model of each plan, and what the
    client loaded: ``e[loader]`` with the pure-torch kernel, ``e[loader + "-auto"]`` with its choice."""
    tmp = tmp_path_factory.mktemp("gptq")
    made = {}

    def add(key, arch, widths, gs=GS, model=None, exclude=None):
        src = tiny_models[arch]
        m = model if model is not None else load_model(src)
        plan = module_plan(m, widths, gs, exclude=exclude)
        out = str(tmp / key)
        info = get_exporter("gptq").export(m, load_tokenizer(src), plan, out)
        fake_quantize_model(m, plan)
        weights = {n: m.get_submodule(n).weight.detach() for n, b in plan.bits.items() if int(b[0]) != 16}
        made[key] = dict(plan=plan, out=out, info=info, ref=reference_logits(m), ref_weights=weights)

    for arch in ("llama", "qwen2"):
        add(f"{arch}-mixed", arch, MIXED)
        add(f"{arch}-uniform3", arch, [3, 3, 3, 16])
    add("llama-uniform2", "llama", [2])
    add("llama-uniform8-row", "llama", [8, 16], gs=-1)
    add("llama-uniform4", "llama", [4])
    add("llama-no-down", "llama", [4], exclude="down_proj")  # block Linears that are no targets
    # a module whose weights are all >= 0 has zero points 0, which GPTQ v1 files cannot hold
    m = load_model(tiny_models["llama"])
    with torch.no_grad():
        w = m.get_submodule("model.layers.1.mlp.up_proj").weight
        w.copy_(w.abs())
    add("llama-v2", "llama", [4], model=m)
    jobs = [(e["out"], "gptqmodel", TORCH) for e in made.values()]
    jobs += [(e["out"], "transformers", TORCH) for e in made.values() if e["info"]["transformers_loadable"]]
    jobs += [(made["llama-mixed"]["out"], "gptqmodel", "auto"), (made["llama-uniform4"]["out"], "transformers", "auto")]
    loaded = load_in_client(client, jobs, tmp)
    for (out, loader, backend), got in loaded.items():
        e = next(e for e in made.values() if e["out"] == out)
        e[loader if backend == TORCH else f"{loader}-auto"] = got
    return made


TORCH = "gptq_torch"
TOL = 2e-3  # of the largest logit: the kernel's float16 matmul (measured: <= 6.7e-4)
AUTO_TOL = 3e-2  # kernels holding scales in bfloat16 (gptqmodel 7.6's for 4 bits; measured: <= 1.2e-2)


def _close(logits, ref, tol=TOL):
    torch.testing.assert_close(logits, ref, rtol=0, atol=tol * float(ref.abs().max()))


def _check(e, loader):
    """The client's weights are bitsearch's bit for bit, its logits within the kernel's rounding."""
    got = e[loader]
    assert got["weights"].keys() == e["ref_weights"].keys()
    for name, w in e["ref_weights"].items():
        assert torch.equal(got["weights"][name], w), name
    _close(got["logits"], e["ref"])


@pytest.mark.parametrize(
    "key", ["llama-uniform3", "qwen2-uniform3", "llama-uniform2", "llama-uniform8-row", "llama-no-down"]
)
def test_transformers_loads_one_width_with_dense_modules(exports, key):
    e = exports[key]
    got = e["transformers"]
    quantized = {n: int(b[0]) for n, b in e["plan"].bits.items() if int(b[0]) != 16}
    assert got["widths"] == quantized and len(set(quantized.values())) == 1
    assert [n for n in BLOCK_LINEARS if n not in quantized] == [n for n in got["dense"] if n in BLOCK_LINEARS]
    _check(e, "transformers")


@pytest.mark.parametrize("key", ["llama-mixed", "qwen2-mixed"])
def test_gptqmodel_loads_each_module_at_its_own_width(exports, key):
    e = exports[key]
    got = e["gptqmodel"]
    widths = {n: int(b[0]) for n, b in e["plan"].bits.items()}
    assert {2, 3, 4, 8} <= set(widths.values()) and 16 in widths.values()
    assert got["widths"] == {n: w for n, w in widths.items() if w != 16}
    assert [n for n, w in widths.items() if w == 16] == [n for n in got["dense"] if n in BLOCK_LINEARS]
    assert "transformers" not in e  # transformers reads no `dynamic`
    _check(e, "gptqmodel")


def test_both_loaders_agree(exports):
    for key in ("llama-uniform3", "llama-uniform2", "llama-uniform4", "llama-uniform8-row"):
        e = exports[key]
        assert e["gptqmodel"]["widths"] == e["transformers"]["widths"]
        _check(e, "gptqmodel")


def test_zero_points_at_zero(exports):
    from safetensors.torch import load_file

    e = exports["llama-v2"]
    qzeros = load_file(os.path.join(e["out"], "model.safetensors"))["model.layers.1.mlp.up_proj.qzeros"]
    assert not qzeros.any()  # every zero point is 0
    _check(e, "gptqmodel")
    _check(e, "transformers")


def test_the_default_kernels_read_the_same_weights(exports):
    """The client's own choice of kernel (backend auto): each module at its width, logits within
    the rounding of its bfloat16 kernels."""
    for key, loader in (("llama-mixed", "gptqmodel"), ("llama-uniform4", "transformers")):
        e = exports[key]
        assert e[f"{loader}-auto"]["widths"] == e[loader]["widths"]
        _close(e[f"{loader}-auto"]["logits"], e["ref"], AUTO_TOL)


def test_quantization_changes_the_logits_more_than_the_tolerance(exports, tiny_models):
    """The tolerances are meaningful: the float model is far outside them."""
    with torch.no_grad():
        flt = load_model(tiny_models["llama"])(IDS).logits
    ref = exports["llama-uniform4"]["ref"]
    assert (flt - ref).abs().max() > 5 * AUTO_TOL * float(ref.abs().max())


def test_packed_checkpoint_keeps_its_learned_scales(client, tiny_models, tmp_path):
    """A packed model (finalize's output) exports its stored codes, scales and zero points."""
    src = tiny_models["llama"]
    m, tok = load_model(src), load_tokenizer(src)
    plan = module_plan(m, [3])
    qparams = {}
    for name in plan.bits:
        scale, zero = choose_qparams(m.get_submodule(name).weight.detach().float(), 3, GS)
        qparams[name] = ((scale.float() * 0.8).half(), zero)  # not the min-max grid
    packed = pack_model(m, plan, qparams)
    e = {"ref": reference_logits(packed)}
    e["ref_weights"] = {n: packed.get_submodule(n).dequantized_weight() for n in plan.bits}
    out = str(tmp_path / "p")
    api.export(packed, plan, out, ExportConfig(format="gptq"), tokenizer=tok)
    e["transformers"] = load_in_client(client, [(out, "transformers", TORCH)], tmp_path)[(out, "transformers", TORCH)]
    _check(e, "transformers")
    rtn = reference_logits(fake_quantize_model(load_model(src), plan))
    assert (rtn - e["ref"]).abs().max() > 10 * TOL * float(e["ref"].abs().max())  # the learned scales survived


def test_per_module_search_is_priced_in_the_format(tiny_models, text_file, tmp_path):
    """search --format gptq: widths the format stores, fused sets tied, the format's bytes within
    budget, and the export writes exactly those bytes."""
    src = tiny_models["llama"]
    out = str(tmp_path / "plan.json")
    common = ["--samples", "4", "--seq-len", "32", "--group-size", str(GS), "--calib-loss-samples", "2"]
    code = main(
        ["--quiet", "search", "--model", src, "--calib", text_file, *common, "--budget", "3.6"]
        + ["--bits", "2,3,4,5,6,8", "--format", "gptq", "--out", out]
    )
    assert code == 0
    plan = BitPlan.load(out)
    w = {n: int(b[0]) for n, b in plan.bits.items()}
    assert all(len(set(b.tolist())) == 1 for b in plan.bits.values())
    assert set(w.values()) <= {2, 3, 4, 8} and len(set(w.values())) > 1
    for i in range(2):
        p = f"model.layers.{i}."
        assert w[p + "self_attn.q_proj"] == w[p + "self_attn.k_proj"] == w[p + "self_attn.v_proj"]
        assert w[p + "mlp.gate_proj"] == w[p + "mlp.up_proj"]
    fmt = plan.summary["format"]
    assert fmt["bytes"] == format_bytes(plan, "gptq") <= int(3.6 * plan.n_weights() / 8)
    assert fmt["bytes"] == sum(module_bytes(*plan.shapes[n], b, GS) for n, b in w.items())
    code = main(["--quiet", "export", "--model", src, "--plan", out, "--format", "gptq", "--out", str(tmp_path / "e")])
    assert code == 0
    assert target_bytes(str(tmp_path / "e"), plan) == fmt["bytes"]
