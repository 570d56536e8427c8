"""One contract for every registered implementation (the optuna samplers-test pattern): every
estimator, allocator, finalizer and exporter is run through the same checks on a tiny Llama.

- estimators: one row per target channel, finite curves whose total falls with the width, the
  same table twice with the same seed;
- allocators: never over the budget, the plan file round-trips, applying it writes exactly its
  bytes, the same plan twice with the same seed;
- finalizers: exactly the plan's bytes in a packed checkpoint that loads, the same weights twice;
- exporters: the written file loads back (for the formats bitsearch reads), the same bytes twice.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from bitsearch import api
from bitsearch.config import ExportConfig, FinalizeConfig, SearchConfig, SensitivityConfig
from bitsearch.errors import BitsearchError
from bitsearch.export import EXPORTERS
from bitsearch.finalize import FINALIZERS
from bitsearch.io.checkpoint import packed_tensor_bytes
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets
from bitsearch.search import ALLOCATORS
from bitsearch.sensitivity import ESTIMATORS

SMALL = dict(samples=4, seq_len=32, group_size=16, loss_calibration_samples=2, show_progress=False)
#: the smallest settings that still exercise each model-in-the-loop method
METHOD_OPTIONS = {"optuna": dict(n_trials=3, kl_samples=2), "diffq": dict(steps=2, kl_samples=2)}
FINALIZER_OPTIONS = dict(
    steps=1, signround_steps=2, batch_size=2, tile_size=1, samples=4, seq_len=32, show_progress=False
)


@pytest.fixture(scope="module")
def loaded(llama_dir):
    return load_model(llama_dir), load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def table(loaded, text_file):
    m, tok = loaded
    return api.sensitivity(m, text_file, SensitivityConfig(bits="2,3,4,8", **SMALL), tokenizer=tok)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_contract(name, loaded, text_file):
    m, tok = loaded
    config = SensitivityConfig(estimators=name, bits="2,3,4,8", probes=2, **SMALL)
    t1 = api.sensitivity(m, text_file, config, tokenizer=tok)
    t2 = api.sensitivity(m, text_file, config, tokenizer=tok)
    assert len(t1.df) == sum(t.out_features for t in find_targets(m))
    e = t1.curves(mix=name)
    assert np.isfinite(e).all() and (e >= 0).all()
    # one channel's output error may rise from one width to the next (rounding errors correlate
    # with the inputs: snr measures that), but over all channels more bits must mean less error
    assert (np.diff(e.sum(axis=0)) < 0).all(), "wider widths predicted more error in total"
    assert np.array_equal(e, t2.curves(mix=name))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_allocator_contract(name, loaded, text_file, table, tmp_path):
    m, tok = loaded
    config = SearchConfig(budget="4.5", method=name, seed=3, **METHOD_OPTIONS.get(name, {}), **SMALL)
    plans = [
        api.search(m, text_file, config, tokenizer=tok, table=table, out=str(tmp_path / f"p{i}.json")) for i in range(2)
    ]
    plan = plans[0]
    assert plan.summary["bytes"] <= plan.provenance["budget_bytes"]
    assert plan.provenance["allocator"] == name
    back = BitPlan.load(str(tmp_path / "p0.json"))
    assert back.summary == plan.summary and all(np.array_equal(back.bits[n], plan.bits[n]) for n in plan.bits)
    assert all(np.array_equal(plans[1].bits[n], plan.bits[n]) for n in plan.bits), "not deterministic"
    api.apply(copy.deepcopy(m), back, out=str(tmp_path / "packed"), tokenizer=tok)
    assert packed_tensor_bytes(str(tmp_path / "packed")) == plan.summary["bytes"]


@pytest.mark.parametrize("name", sorted(FINALIZERS))
def test_finalizer_contract(name, loaded, text_file, tmp_path):
    m, tok = loaded
    plan = api.search(m, text_file, SearchConfig(budget="4.5", **SMALL), tokenizer=tok)
    config = FinalizeConfig(method=name, **FINALIZER_OPTIONS)
    outs = []
    for i in range(2):
        out = str(tmp_path / f"f{i}")
        api.finalize(copy.deepcopy(m), plan, text_file, config, tokenizer=tok, out=out)
        assert packed_tensor_bytes(out) == plan.summary["bytes"]
        outs.append(load_model(out))
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(outs[0](input_ids=x).logits, outs[1](input_ids=x).logits), "not deterministic"
        assert torch.isfinite(outs[0](input_ids=x).logits).all()


@pytest.mark.parametrize("name", sorted(EXPORTERS))
def test_exporter_contract(name, loaded, text_file, tmp_path):
    m, tok = loaded
    exporter = EXPORTERS[name]
    for module in exporter.requires:
        pytest.importorskip(module)
    # a plan of the unit the format stores (per-module formats are searched for that format)
    fmt = name if exporter.plan_unit == "module" else None
    plan = api.search(m, text_file, SearchConfig(budget="4.5", format=fmt, **SMALL), tokenizer=tok)
    if exporter.plan_unit == "tensor":  # its own plan; a per-channel one is refused in one line
        with pytest.raises(BitsearchError, match=f"search --format {name}") as err:
            api.export(copy.deepcopy(m), plan, str(tmp_path / "refused"), ExportConfig(format=name), tokenizer=tok)
        assert "\n" not in str(err.value)
        plan = api.search(m, text_file, SearchConfig(format=name, budget="4.5", **SMALL), tokenizer=tok)
    outs = [str(tmp_path / f"e{i}") for i in range(2)]
    infos = [api.export(copy.deepcopy(m), plan, out, ExportConfig(format=name), tokenizer=tok) for out in outs]
    assert all(os.path.exists(o) for o in outs)
    # the same result twice (paths named after the output aside), and a single file byte for byte
    same = [{k: v.replace(o, "OUT") if isinstance(v, str) else v for k, v in i.items()} for i, o in zip(infos, outs)]
    assert same[0] == same[1]
    if exporter.writes == "file":
        assert open(outs[0], "rb").read() == open(outs[1], "rb").read()
    assert exporter.plan_unit in ("channel", "tensor", "module")
