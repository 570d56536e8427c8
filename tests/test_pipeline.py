"""End to end on tiny random models of five families: sensitivity -> search -> apply -> eval."""

import os

import numpy as np
import pytest
import torch
from conftest import ARCHS

from bitsearch import api
from bitsearch.config import ApplyConfig, EvalConfig, SearchConfig, SensitivityConfig
from bitsearch.errors import BitsearchError
from bitsearch.io.checkpoint import load_packed, packed_tensor_bytes
from bitsearch.io.loading import load_model
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets
from bitsearch.quantize import fake_quantize_model, pack_model
from bitsearch.sensitivity import SensitivityTable

SMALL = dict(samples=4, seq_len=32, group_size=16, loss_calibration_samples=2, show_progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end(arch, tiny_models, text_file, tmp_path):
    model = tiny_models[arch]
    table_path = str(tmp_path / "t.parquet")
    table = api.sensitivity(model, text_file, SensitivityConfig(**SMALL), out=table_path)
    assert table.meta["units"].startswith("calibration-loss")
    m = load_model(model)
    targets = find_targets(m)
    assert len(table.df) == sum(t.out_features for t in targets)
    # curves fall with width; calibrated 2-bit curves of a layer sum to its measured response
    e = table.curves()
    assert (np.diff(e[:, 1:], axis=1) <= 1e-12).all()
    for name, g in table.df.groupby("layer"):
        assert g["imatrix.e2"].sum() == pytest.approx(max(g["imatrix.layer_response"].iloc[0], 1e-6), rel=1e-6)
        # pruning has its own scale: the rows pruned to measure it sum to the measured response
        k = max(1, round(table.meta["prune_fraction"] * len(g)))
        assert np.sort(g["imatrix.e0"].to_numpy())[:k].sum() == pytest.approx(
            max(g["imatrix.prune_response"].iloc[0], 1e-6), rel=1e-6
        )

    plan_path = str(tmp_path / "plan.json")
    # groups of 16 cost 1.5 bits of scales and zeros: 2-bit rows cost 3.5 bits all-in
    plan = api.search(
        model, None, SearchConfig(budget="4.5", group_size=16, show_progress=False), table=table_path, out=plan_path
    )
    assert plan.summary["avg_bits"] <= 4.5
    assert plan.summary["avg_bits"] > 4.4  # the budget is used
    loaded = BitPlan.load(plan_path)
    assert loaded.summary == plan.summary

    out = str(tmp_path / "packed")
    applied = api.apply(model, plan_path, out=out)
    # the bytes search predicted are the bytes apply wrote, to the byte
    assert applied.bitsearch_plan.summary["bytes"] == plan.summary["bytes"] == packed_tensor_bytes(out)

    packed = load_packed(out)
    fake = fake_quantize_model(load_model(model), loaded)
    in_memory = pack_model(load_model(model), loaded)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a = packed(input_ids=x).logits
        b = fake(input_ids=x).logits
        c = in_memory(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a, c)

    r = api.evaluate(
        out,
        text_file,
        EvalConfig(max_tokens=300, seq_len=64, show_progress=False),
        out=str(tmp_path / "r.json"),
        reference=model,
    )
    assert np.isfinite(r.ppl) and r.kl > 0 and r.tokens == 300
    assert os.path.isfile(tmp_path / "r.json")


def test_fake_checkpoint_loads_in_plain_hf(llama_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = api.search(llama_dir, text_file, SearchConfig(budget="4.5", **SMALL), out=str(tmp_path / "p.json"))
    api.apply(llama_dir, str(tmp_path / "p.json"), ApplyConfig(fake=True), out=str(tmp_path / "fake"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fake"))
    ref = fake_quantize_model(load_model(llama_dir), plan)
    for (n1, p1), (n2, p2) in zip(hf.named_parameters(), ref.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_pruned_channels_output_only_bias(tiny_models, text_file, tmp_path):
    """A plan forced to prune (tiny budget, 0 in the menu) gives zero rows in the packed model."""
    model = tiny_models["opt"]  # OPT linears have biases
    plan = api.search(
        model, text_file, SearchConfig(budget="0.5", bits="0,2", min_bits=0, **SMALL), out=str(tmp_path / "p.json")
    )
    assert plan.summary["pruned_channels"] > 0
    api.apply(model, str(tmp_path / "p.json"), out=str(tmp_path / "packed"))
    packed = load_packed(str(tmp_path / "packed"))
    name, bits = next((n, b) for n, b in plan.bits.items() if (b == 0).any())
    w = packed.get_submodule(name).dequantized_weight()
    assert (w[torch.as_tensor(bits == 0)] == 0).all()


def test_targets_and_exclude(llama_dir):
    m = load_model(llama_dir)
    all_t = find_targets(m)
    assert len(all_t) == 2 * 7
    mlp = find_targets(m, targets=r"mlp\.")
    assert {t.name.rsplit(".", 1)[1] for t in mlp} == {"gate_proj", "up_proj", "down_proj"}
    assert len(find_targets(m, exclude=r"q_proj|k_proj")) == 2 * 5


def test_table_round_trip(llama_dir, text_file, tmp_path):
    t = api.sensitivity(llama_dir, text_file, SensitivityConfig(**SMALL), out=str(tmp_path / "t.parquet"))
    back = SensitivityTable.load(str(tmp_path / "t.parquet"))
    assert back.meta["bits"] == t.meta["bits"] and back.group_size == 16
    assert np.array_equal(back.curves(), t.curves())


def test_apply_packs_an_in_memory_model_in_place(llama_dir, text_file, tmp_path):
    """apply on an nn.Module packs it in place (as torchao's quantize_ does) and writes the same
    model that loading the written checkpoint gives."""
    from bitsearch.io.loading import load_tokenizer
    from bitsearch.packed import PackedLinear

    plan = api.search(llama_dir, text_file, SearchConfig(budget="4.5", **SMALL))
    m, tok = load_model(llama_dir), load_tokenizer(llama_dir)
    out = api.apply(m, plan, out=str(tmp_path / "p"), tokenizer=tok)
    assert out is m and m.bitsearch_plan is plan
    assert all(isinstance(m.get_submodule(n), PackedLinear) for n in plan.bits)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, load_packed(str(tmp_path / "p"))(input_ids=x).logits)


def test_inline_search_skips_widths_it_cannot_pick(llama_dir, text_file, monkeypatch):
    """With the default --min-bits 2, search computes no 0-bit curves (and no pruning response)."""
    from bitsearch.sensitivity import pipeline

    called = []
    monkeypatch.setattr(pipeline, "prune_loss_response", lambda *a, **k: called.append(1) or {})
    plan = api.search(llama_dir, text_file, SearchConfig(budget="4.5", **SMALL))
    assert not called and plan.menu == [2, 3, 4, 5, 6, 8]


def test_multi_estimator_table_search_and_plot(llama_dir, text_file, tmp_path, capsys):
    """One table with every estimator; each estimator, a mix and water-filling give plans within
    budget; the plot command draws it."""
    from bitsearch.cli import main

    path = str(tmp_path / "all.parquet")
    t = api.sensitivity(
        llama_dir, text_file, SensitivityConfig(estimators="imatrix,snr,fisher,hutchinson", probes=2, **SMALL), out=path
    )
    assert t.estimators == ["imatrix", "snr", "fisher", "hutchinson"]
    assert t.meta["estimator_info"]["fisher"]["calibration"] == "native"
    assert t.meta["estimator_info"]["snr"]["calibration"] == "gradient"
    assert all(np.isfinite(t.curves(mix=e)).all() for e in t.estimators)
    plans = {}
    for mix, method in [
        ("imatrix", "greedy"),
        ("snr", "greedy"),
        ("fisher", "greedy"),
        ("hutchinson", "greedy"),
        (None, "greedy"),
        ("snr", "snr"),
    ]:
        p = api.search(
            llama_dir,
            None,
            SearchConfig(budget="4.5", group_size=16, mix=mix, method=method, show_progress=False),
            table=path,
        )
        assert 4.3 < p.summary["avg_bits"] <= 4.5
        plans[(mix, method)] = p
    assert plans[(None, "greedy")].provenance["estimator_mix"] == "imatrix=0.25,snr=0.25,fisher=0.25,hutchinson=0.25"
    assert any(
        not np.array_equal(plans[("imatrix", "greedy")].bits[n], plans[("fisher", "greedy")].bits[n])
        for n in plans[("imatrix", "greedy")].bits
    )
    assert main(["plot", "sensitivity", "--table", path, "--estimator", "snr", "--out", str(tmp_path / "s.png")]) == 0
    assert os.path.getsize(tmp_path / "s.png") > 10000
    plans[("snr", "snr")].save(str(tmp_path / "wf.json"))
    assert main(["plot", "plan", "--plan", str(tmp_path / "wf.json"), "--out", str(tmp_path / "p.png")]) == 0
    assert os.path.getsize(tmp_path / "p.png") > 10000


def test_ilp_from_the_cli_with_runtime_constraints(llama_dir, text_file, tmp_path):
    """--method ilp with shared q/k/v widths per layer and a floor for down_proj."""
    path = str(tmp_path / "t.parquet")
    api.sensitivity(llama_dir, text_file, SensitivityConfig(bits="2,3,4,8", **SMALL), out=path)
    plan = api.search(
        llama_dir,
        None,
        SearchConfig(
            budget="4.5",
            group_size=16,
            method="ilp",
            granularity="layer",
            share=["^(.*)\\.self_attn\\.[qkv]_proj$"],
            layer_min_bits=["down_proj=3"],
            show_progress=False,
        ),
        table=path,
    )
    assert plan.summary["avg_bits"] <= 4.5
    for blk in range(2):
        widths = {k: set(plan.bits[f"model.layers.{blk}.self_attn.{k}_proj"].tolist()) for k in "qkv"}
        assert widths["q"] == widths["k"] == widths["v"] and len(widths["q"]) == 1
        assert min(plan.bits[f"model.layers.{blk}.mlp.down_proj"]) >= 3
    greedy = api.search(llama_dir, None, SearchConfig(budget="4.5", group_size=16, show_progress=False), table=path)
    exact = api.search(
        llama_dir, None, SearchConfig(budget="4.5", group_size=16, method="ilp", show_progress=False), table=path
    )
    assert exact.summary["predicted_error"] <= greedy.summary["predicted_error"] + 1e-12
    with pytest.raises(BitsearchError, match="options of the ilp method"):
        api.search(llama_dir, None, SearchConfig(budget="4.5", group_size=16, granularity="layer"), table=path)


@pytest.mark.parametrize("calibrate", ["auto", "gradient", "layer-loss"])
def test_calibrations_scale_curves_to_their_responses(calibrate, llama_dir, text_file):
    """auto and gradient calibrate by the responses predicted from one forward+backward on every
    calibration sample, layer-loss by the per-layer measurement on its subset; either way a
    layer's 2-bit curves sum to its response and its cheapest rows' 0-bit curves to the pruning one."""
    from bitsearch.data import calibration_batches
    from bitsearch.io.loading import load_tokenizer
    from bitsearch.sensitivity.calibrate import layer_loss_response, prune_loss_response, prune_rows
    from bitsearch.sensitivity.grad_response import gradient_responses

    kw = dict(SMALL, loss_calibration_samples=4 if calibrate != "layer-loss" else 2, bits="0,2,4")
    table = api.sensitivity(llama_dir, text_file, SensitivityConfig(loss_calibration=calibrate, **kw))
    method = "layer-loss" if calibrate == "layer-loss" else "gradient"
    assert table.meta["calibration_method"] == method
    assert table.meta["estimator_info"]["imatrix"]["calibration"] == method
    m = load_model(llama_dir)
    targets = find_targets(m)
    batch, _ = calibration_batches(load_tokenizer(llama_dir), text_file, 4, 32, 0)
    raw = api.sensitivity(llama_dir, text_file, SensitivityConfig(loss_calibration="none", **kw))
    from bitsearch.sensitivity.base import LayerCurves

    curves = {
        name: LayerCurves(errors=g[["imatrix.e0", "imatrix.e2", "imatrix.e4"]].to_numpy(), metrics={})
        for name, g in raw.df.groupby("layer", sort=False)
    }
    rows = prune_rows(curves, [0, 2, 4], 0.125)
    if method == "gradient":
        want, prune = gradient_responses(m, targets, batch, 2, 16, {"imatrix": rows}, show_progress=False)
        prune = prune["imatrix"]
    else:
        want = layer_loss_response(m, targets, batch[:2], 2, 16, show_progress=False)
        prune = prune_loss_response(m, targets, batch[:2], rows, show_progress=False)
    for name, g in table.df.groupby("layer"):
        assert g["imatrix.layer_response"].iloc[0] == pytest.approx(want[name], rel=1e-6, abs=1e-12)
        assert g["imatrix.e2"].sum() == pytest.approx(max(want[name], 1e-6), rel=1e-6)
        assert g["imatrix.prune_response"].iloc[0] == pytest.approx(prune[name], rel=1e-6, abs=1e-12)


def test_gradient_calibration_refuses_offload(llama_dir, text_file):
    with pytest.raises(BitsearchError, match="cannot be combined with `offload`"):
        api.sensitivity(llama_dir, text_file, SensitivityConfig(loss_calibration="gradient", offload=True, **SMALL))
