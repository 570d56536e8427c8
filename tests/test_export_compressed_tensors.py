"""compressed-tensors export, checked by the real clients: transformers (with the compressed-tensors
package) loads the export in a process that never imports bitsearch, and its logits equal
bitsearch's fake-quantized model of the same plan; compressed-tensors' own decompressor reads the
"group" layout; the bytes on disk are the format's price the per-module search budgets with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import plans
import pytest
import torch
from plans import target_bytes

pytest.importorskip("compressed_tensors")

from bitsearch import api  # noqa: E402
from bitsearch.cli import main  # noqa: E402
from bitsearch.config import ExportConfig, SearchConfig, SensitivityConfig  # noqa: E402
from bitsearch.errors import BitsearchError  # noqa: E402
from bitsearch.export import get_exporter  # noqa: E402
from bitsearch.export.compressed_tensors import module_bytes  # noqa: E402
from bitsearch.io.loading import load_model, load_tokenizer  # noqa: E402
from bitsearch.io.plan import BitPlan  # noqa: E402
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.quantize import fake_quantize_model, pack_model  # noqa: E402
from bitsearch.search.formats import format_bytes  # noqa: E402
from bitsearch.search.ilp import IlpAllocator  # noqa: E402

GS = 16
WIDTHS = [2, 3, 5, 6, 4, 8, 7, 16]  # 2, 3, 5 and 6 first: every tiny model has them
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])

# runs in a fresh interpreter: transformers + compressed-tensors only
LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
job = json.load(open(sys.argv[1]))
ids = torch.tensor(job["ids"])
out = {}
for d in job["dirs"]:
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        logits = m(ids).logits
    torch.save(logits, d + ".logits.pt")
    torch.save({n: p.detach() for n, p in m.named_parameters() if n.endswith(".weight")}, d + ".weights.pt")
    widths = {}
    for name, mod in m.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            widths[name] = scheme.weights.num_bits
    out[d] = {"widths": widths, "dtype": str(m.dtype)}
assert not any(k == "bitsearch" or k.startswith("bitsearch.") for k in sys.modules)
json.dump(out, open(sys.argv[2], "w"))
"""


def load_in_transformers(dirs: list[str], tmp) -> tuple[dict, dict]:
    """Load each export in a subprocess without bitsearch: (logits per dir, report per dir)."""
    job, report = tmp / "job.json", tmp / "report.json"
    job.write_text(json.dumps({"dirs": dirs, "ids": IDS.tolist()}))
    script = tmp / "loader.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, str(script), str(job), str(report)],
        cwd=str(tmp),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(report.read_text())
    for d in dirs:
        report[d]["weights"] = torch.load(d + ".weights.pt")
    return {d: torch.load(d + ".logits.pt") for d in dirs}, report


def module_plan(model, widths=WIDTHS, gs: int = GS) -> BitPlan:
    return plans.module_plan(model, widths, gs)


def reference_model(model_dir: str, plan: BitPlan):
    return fake_quantize_model(load_model(model_dir), plan)


def reference_logits(model_dir: str, plan: BitPlan) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(model_dir, plan)(IDS).logits


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    """Per architecture: the plan, bitsearch's logits and the export (plus one with shuffled groups)."""
    tmp = tmp_path_factory.mktemp("ct")
    made = {}
    for arch in ("llama", "qwen2"):
        src = tiny_models[arch]
        m, tok = load_model(src), load_tokenizer(src)
        plan = module_plan(m)
        out = str(tmp / arch)
        info = get_exporter("compressed-tensors").export(m, tok, plan, out)
        shuffled = str(tmp / f"{arch}-shuffled")
        info_s = get_exporter("compressed-tensors").export(m, tok, plan, shuffled)
        cfg_path = os.path.join(shuffled, "config.json")
        cfg = json.load(open(cfg_path))
        groups = list(cfg["quantization_config"]["config_groups"].values())
        rng = np.random.default_rng(1)
        order = rng.permutation(len(groups))
        assert list(order) != list(range(len(groups)))
        # new names and a new order: group_0 now holds what another group held
        cfg["quantization_config"]["config_groups"] = {f"group_{i}": groups[j] for i, j in enumerate(order)}
        json.dump(cfg, open(cfg_path, "w"))
        with torch.no_grad():
            float_logits = m(IDS).logits
        ref_model = reference_model(src, plan)
        with torch.no_grad():
            ref = ref_model(IDS).logits
        made[arch] = dict(
            plan=plan,
            out=out,
            shuffled=shuffled,
            info=info,
            info_s=info_s,
            ref=ref,
            float=float_logits,
            ref_weights={n + ".weight": ref_model.get_submodule(n).weight.detach() for n in plan.bits},
        )
    dirs = [v[k] for v in made.values() for k in ("out", "shuffled")]
    logits, report = load_in_transformers(dirs, tmp)
    for v in made.values():
        v["logits"], v["report"] = logits[v["out"]], report[v["out"]]
        v["logits_shuffled"], v["report_shuffled"] = logits[v["shuffled"]], report[v["shuffled"]]
    return made


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_logits_equal_bitsearch(exports, arch):
    e = exports[arch]
    assert e["report"]["dtype"] == "torch.float32"
    assert (e["ref"] - e["float"]).abs().max() > 1e-2  # the plan does change the model
    torch.testing.assert_close(e["logits"], e["ref"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loaded_weights_are_bitsearchs_bit_for_bit(exports, arch):
    e = exports[arch]
    loaded = e["report"]["weights"]
    assert len(e["ref_weights"]) == len(e["plan"].bits)
    for name, w in e["ref_weights"].items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], w), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_module_reloads_at_its_own_width(exports, arch):
    e = exports[arch]
    expected = {n: int(b[0]) for n, b in e["plan"].bits.items() if int(b[0]) != 16}
    assert {2, 3, 5, 6} <= set(expected.values())
    assert e["report"]["widths"] == expected
    kept = [n for n, b in e["plan"].bits.items() if int(b[0]) == 16]
    assert kept and not set(kept) & set(e["report"]["widths"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_group_order_changes_nothing(exports, arch):
    e = exports[arch]
    assert e["report_shuffled"]["widths"] == e["report"]["widths"]
    assert torch.equal(e["logits_shuffled"], e["logits"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bytes_on_disk_are_the_formats_price(exports, arch):
    e = exports[arch]
    plan = e["plan"]
    on_disk = target_bytes(e["out"], plan)
    assert on_disk == e["info"]["target_bytes"] == e["info"]["predicted_target_bytes"]
    assert on_disk == format_bytes(plan, "compressed-tensors")
    by_hand = 0
    for name, b in plan.bits.items():
        r, k = plan.shapes[name]
        w = int(b[0])
        ng = k // GS
        by_hand += 2 * r * k if w == 16 else 4 * r * -(-k * w // 32) + 2 * r * ng + r * ng + 16
    assert on_disk == by_hand


@pytest.mark.parametrize("gs", [GS, -1])
def test_group_layout_is_read_by_compressed_tensors(tiny_models, tmp_path, gs):
    """The llm-compressor / vLLM layout (packed zero points), decompressed by the package itself
    (strategy group, or channel for one group a row)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    src = tiny_models["llama"]
    m = load_model(src)
    plan = module_plan(m, widths=[2, 3, 5, 6, 7, 4, 8], gs=gs)
    exp = get_exporter("compressed-tensors", layout="group")
    info = exp.export(m, None, plan, str(tmp_path / "g"))
    assert target_bytes(str(tmp_path / "g"), plan) == info["predicted_target_bytes"] == info["target_bytes"]
    cfg = json.load(open(tmp_path / "g" / "config.json"))["quantization_config"]
    tensors = load_file(str(tmp_path / "g" / "model.safetensors"))
    fake_quantize_model(m, plan)
    modules = dict(m.named_modules())
    seen = 0
    for group in cfg["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        if gs == -1:
            assert scheme.weights.strategy == "channel"
        else:
            assert scheme.weights.strategy == "group" and scheme.weights.group_size == gs
        compressor = BaseCompressor.get_value_from_registry(cfg["format"])
        for name in scheme.targets:
            sd = {
                k: tensors[f"{name}.{k}"]
                for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
            }
            r = sd["weight_shape"][0].item()
            assert sd["weight_zero_point"].shape == (-(-r * scheme.weights.num_bits // 32), sd["weight_scale"].shape[1])
            sd["weight_scale"] = sd["weight_scale"].float()
            w = compressor.decompress(sd, scheme)["weight"]
            assert torch.equal(w, modules[name].weight.detach()), name
            seen += 1
    assert seen == len(plan.bits)


def test_one_group_a_row_loads_in_transformers(tiny_models, tmp_path):
    """group size -1: one block a row, whose width is each module's own input size."""
    src = tiny_models["llama"]
    m, tok = load_model(src), load_tokenizer(src)
    plan = module_plan(m, widths=[3, 5], gs=-1)
    out = str(tmp_path / "row")
    info = get_exporter("compressed-tensors").export(m, tok, plan, out)
    groups = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["config_groups"]
    assert {tuple(g["weights"]["block_structure"]) for g in groups.values()} == {(1, 64), (1, 128)}
    assert target_bytes(out, plan) == info["predicted_target_bytes"]
    logits, report = load_in_transformers([out], tmp_path)
    assert report[out]["widths"] == {n: int(b[0]) for n, b in plan.bits.items()}
    torch.testing.assert_close(logits[out], reference_logits(src, plan), rtol=1e-5, atol=1e-5)


def test_packed_checkpoint_keeps_its_learned_scales(tiny_models, tmp_path):
    """A packed model (finalize's output) exports its stored codes, scales and zero points."""
    src = tiny_models["qwen2"]
    m, tok = load_model(src), load_tokenizer(src)
    plan = module_plan(m, widths=[3, 4, 2])
    qparams = {}
    for name in plan.bits:
        w = m.get_submodule(name).weight.detach().float()
        b = int(plan.bits[name][0])
        from bitsearch.quant.grid import choose_qparams

        scale, zero = choose_qparams(w, b, GS)
        qparams[name] = ((scale.float() * 0.8).half(), zero)  # not the min-max grid
    packed = pack_model(m, plan, qparams)
    with torch.no_grad():
        ref = packed(IDS).logits
    api.export(packed, plan, str(tmp_path / "p"), ExportConfig(format="compressed-tensors"), tokenizer=tok)
    logits, _ = load_in_transformers([str(tmp_path / "p")], tmp_path)
    torch.testing.assert_close(logits[str(tmp_path / "p")], ref, rtol=1e-5, atol=1e-5)
    rtn = reference_logits(src, plan)
    assert (rtn - ref).abs().max() > 1e-3  # the learned scales made a difference that survived


def test_refusals(tiny_models, tmp_path):
    m = load_model(tiny_models["llama"])
    exp = get_exporter("compressed-tensors")
    plan = module_plan(m, widths=[4, 3])
    first = next(iter(plan.bits))
    plan.bits[first] = plan.bits[first].copy()
    plan.bits[first][0] = 3
    with pytest.raises(BitsearchError, match="per-module"):
        exp.export(m, None, plan, str(tmp_path / "a"))
    plan = module_plan(m, widths=[4, 0])
    with pytest.raises(BitsearchError, match="pruned"):
        exp.export(m, None, plan, str(tmp_path / "b"))
    plan = module_plan(m, widths=[4], gs=24)
    with pytest.raises(BitsearchError, match="multiple of the group size"):
        exp.export(m, None, plan, str(tmp_path / "c"))
    with pytest.raises(BitsearchError, match="layout"):
        get_exporter("compressed-tensors", layout="zigzag")
    assert not any(p.name in "abc" for p in tmp_path.iterdir())


def test_per_module_search_is_priced_in_the_format(tiny_models, text_file, tmp_path):
    """search --format: one width per module, q/k/v and gate/up tied, the format's bytes within budget,
    and the export writes exactly those bytes."""
    src = tiny_models["llama"]
    out = str(tmp_path / "plan.json")
    code = main(
        [
            "--quiet",
            "search",
            "--model",
            src,
            "--calib",
            text_file,
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--group-size",
            str(GS),
            "--calib-loss-samples",
            "2",
            "--budget",
            "4.0",
            "--format",
            "compressed-tensors",
            "--out",
            out,
        ]
    )
    assert code == 0
    plan = BitPlan.load(out)
    widths = {n: set(b.tolist()) for n, b in plan.bits.items()}
    assert all(len(w) == 1 for w in widths.values())
    w = {n: next(iter(s)) for n, s in widths.items()}
    for i in range(2):
        p = f"model.layers.{i}."
        assert w[p + "self_attn.q_proj"] == w[p + "self_attn.k_proj"] == w[p + "self_attn.v_proj"]
        assert w[p + "mlp.gate_proj"] == w[p + "mlp.up_proj"]
    fmt = plan.summary["format"]
    n_weights = plan.n_weights()
    assert fmt["bytes"] == format_bytes(plan, "compressed-tensors") <= int(4.0 * n_weights / 8)
    assert fmt["bytes"] == sum(module_bytes(*plan.shapes[n], b, GS) for n, b in w.items())
    assert len(set(w.values())) > 1  # the budget lies between uniform widths: a mix
    code = main(
        [
            "--quiet",
            "export",
            "--model",
            src,
            "--plan",
            out,
            "--format",
            "compressed-tensors",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert code == 0
    assert target_bytes(str(tmp_path / "e"), plan) == fmt["bytes"]


def test_cli_refuses_a_per_channel_plan(tiny_models, tmp_path, capsys):
    m = load_model(tiny_models["llama"])
    plan = module_plan(m, widths=[4, 2])
    name = next(iter(plan.bits))
    plan.bits[name] = plan.bits[name].copy()
    plan.bits[name][1] = 2
    plan.fill_summary()
    plan.save(str(tmp_path / "p.json"))
    code = main(
        [
            "export",
            "--model",
            tiny_models["llama"],
            "--plan",
            str(tmp_path / "p.json"),
            "--format",
            "compressed-tensors",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--format compressed-tensors" in err[0]
    assert not (tmp_path / "e").exists()


def test_fused_module_search_is_the_brute_force_optimum(tiny_models, text_file):
    """ilp at layer granularity with the fused sets, on format prices, finds the best assignment of
    one width per fused set that fits the budget (checked by enumerating all of them)."""
    import itertools

    from bitsearch.search.formats import module_search_options

    src = tiny_models["llama"]
    m, tok = load_model(src), load_tokenizer(src)
    table = api.sensitivity(
        m,
        text_file,
        SensitivityConfig(
            samples=4, seq_len=32, group_size=GS, bits="2,3,4,8", loss_calibration_samples=2, show_progress=False
        ),
        tokenizer=tok,
    )
    targets = find_targets(m)
    fp = model_fingerprint(m, targets)
    shapes = {t.name: (t.out_features, t.in_features) for t in targets}
    err = {t.name: table.curves(layer=t.name, bits=[2, 3, 4, 8]).sum(axis=0) for t in targets}
    sets: dict[str, list[str]] = {}
    for t in targets:
        kind = t.name.rsplit(".", 1)[1]
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(kind, kind)
        sets.setdefault(".".join(t.name.split(".")[:3]) + key, []).append(t.name)  # model.layers.i + set
    assert len(sets) == 8
    n_weights = sum(t.numel for t in targets)
    for budget in ("3.9", "4.6", "6.0"):
        limit = int(float(budget) * n_weights / 8)
        best = None
        for choice in itertools.product(range(4), repeat=len(sets)):
            widths = {n: [2, 3, 4, 8][c] for c, names in zip(choice, sets.values()) for n in names}
            cost = sum(module_bytes(*shapes[n], b, GS) for n, b in widths.items())
            if cost <= limit:
                e = sum(err[n][[2, 3, 4, 8].index(b)] for n, b in widths.items())
                best = e if best is None or e < best else best
        config = SearchConfig(
            budget=budget,
            method="ilp",
            bits="2,3,4,8",
            group_size=GS,
            format="compressed-tensors",
            **module_search_options(True),
        )
        plan = api.search_plan(
            table,
            targets,
            fp,
            config,
            allocator=IlpAllocator(granularity="layer", share=module_search_options(True)["share"], mip_rel_gap=0),
        )
        assert plan.summary["format"]["bytes"] <= limit
        assert plan.summary["predicted_error"] == pytest.approx(best, rel=1e-9), budget
