"""plot_plan: the one-figure overview of a bit plan (synthetic plans, no model)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bitsearch.errors import BitsearchError
from bitsearch.io.plan import BitPlan
from bitsearch.plots.plan import plot_plan

MENU = [0, 2, 3, 4, 8, 16]
# llama-like block, hidden 384, intermediate 1024: 3968 channels per block
TYPES = {
    "self_attn.q_proj": (384, 384),
    "self_attn.k_proj": (384, 384),
    "self_attn.v_proj": (384, 384),
    "self_attn.o_proj": (384, 384),
    "mlp.gate_proj": (1024, 384),
    "mlp.up_proj": (1024, 384),
    "mlp.down_proj": (384, 1024),
}


def make_plan(n_blocks: int = 2, pruned: bool = True, lm_head: bool = False, seed: int = 0, menu=MENU) -> BitPlan:
    rng = np.random.default_rng(seed)
    targets, bits = {}, {}
    quant = [w for w in menu if w not in (0, 16)]
    for blk in range(n_blocks):
        for j, (t, shape) in enumerate(TYPES.items()):
            name = f"model.layers.{blk}.{t}"
            # more bits in the first/last blocks and in v/down, a few fp16 rows, some pruned ones
            level = 0.8 + 0.6 * (blk in (0, n_blocks - 1)) + 0.5 * ("v_proj" in t or "down_proj" in t)
            idx = np.clip(np.round(level + rng.normal(0, 0.8, shape[0])), 0, len(quant) - 1).astype(int)
            b = np.array(quant, dtype=np.uint8)[idx]
            if 16 in menu:
                b[rng.random(shape[0]) < 0.004] = 16
            if pruned and 0 in menu:
                b[rng.random(shape[0]) < (0.03 + 0.08 * ("k_proj" in t))] = 0
            targets[name] = list(shape)
            bits[name] = b
    if lm_head:
        b = np.array(quant, dtype=np.uint8)[np.clip(rng.integers(1, 4, 4000), 0, len(quant) - 1)]
        targets["lm_head"] = [4000, 384]
        bits["lm_head"] = b
    model = {"model_type": "llama", "sha256": "ab" * 32, "targets": targets}
    p = BitPlan(model=model, group_size=64, menu=list(menu), bits=bits)
    p.fill_summary(predicted_error=1.0)
    return p


def _check_png(path: str) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[:2] == (10 * 120, 14 * 120)
    assert img.shape[2] in (3, 4)
    assert float(np.std(img[..., :3])) > 0.05  # not a blank canvas


def test_plot_two_blocks_with_pruned(tmp_path):
    plan = make_plan(2, pruned=True)
    assert plan.summary["pruned_channels"] > 0
    out = str(tmp_path / "sub" / "plan.png")  # folder is created
    assert plot_plan(plan, out, title="toy") == out
    _check_png(out)
    assert os.listdir(tmp_path / "sub") == ["plan.png"]  # no temporary left behind


def test_plot_many_blocks_channel_order_and_lm_head(tmp_path):
    plan = make_plan(32, pruned=True, lm_head=True, seed=1)
    assert len(plan.bits) == 7 * 32 + 1
    out = str(tmp_path / "plan32.png")
    plot_plan(plan, out, sort_channels=False)
    _check_png(out)
    assert os.listdir(tmp_path) == ["plan32.png"]


def test_plot_from_saved_plan_without_pruning(tmp_path):
    plan = make_plan(8, pruned=False, menu=[2, 3, 4, 5, 6, 7, 8])
    path = str(tmp_path / "plan.json")
    plan.save(path)
    loaded = BitPlan.load(path)
    loaded.summary = {}  # the figure falls back on the plan's widths
    out = str(tmp_path / "p.png")
    plot_plan(loaded, out)
    _check_png(out)
    assert sorted(os.listdir(tmp_path)) == ["p.png", "plan.json"]


def test_empty_plan_is_an_error(tmp_path):
    plan = BitPlan(model={"model_type": "llama", "sha256": "ab" * 32, "targets": {}}, group_size=64, menu=MENU, bits={})
    out = str(tmp_path / "empty.png")
    with pytest.raises(BitsearchError, match="no layers") as exc:
        plot_plan(plan, out)
    assert "\n" not in str(exc.value)
    assert os.listdir(tmp_path) == []
