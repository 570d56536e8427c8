"""plot_sensitivity: the one-figure overview of a sensitivity table (synthetic tables, no model)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from bitsearch.errors import BitsearchError
from bitsearch.plots.sensitivity import layer_block_and_type, plot_sensitivity
from bitsearch.sensitivity.table import SensitivityTable

BITS = [0, 2, 3, 4, 8]


def make_table(
    n_blocks: int = 2, channels: int = 48, snr: bool = True, seed: int = 0, types=("self_attn.q_proj", "mlp.down_proj")
) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    names = [(i, j, f"model.layers.{i}.{t}") for i in range(n_blocks) for j, t in enumerate(types)]
    names.append((n_blocks, len(types), "lm_head"))
    frames = []
    for block, j, name in names:
        spread = 1.2 if "down_proj" in name else 0.3 + 0.1 * j  # down_proj: wide per-channel spread
        level = -3 + 0.04 * block + 0.25 * j + 0.2 * rng.normal()
        signal = 10 ** rng.normal(1.0, 0.3, channels)
        scale = 10 ** (level + spread * rng.normal(size=channels))
        cols = {"layer": name, "channel": np.arange(channels), "in_features": 64}
        for b in BITS:
            imat = signal if b == 0 else scale * 4.0 ** -(b - 2) * (1 + 0.05 * j) ** (b - 2)
            cols[f"imatrix.e{b}"] = imat
        if snr:
            slope = rng.normal(5.9 - 0.15 * j, 0.3, channels)
            noise = {
                b: (signal if b == 0 else signal * 10 ** (-(8 + slope * (b - 2) + rng.normal(0, 2, channels)) / 10))
                for b in BITS
            }
            for b in BITS:
                cols[f"snr.e{b}"] = noise[b]
                if b:
                    cols[f"snr.db{b}"] = 10 * np.log10(signal / noise[b])
            cols["snr.slope_db"] = slope
            cols["snr.signal"] = signal
        frames.append(pd.DataFrame(cols))
    ests = ["imatrix", "snr"] if snr else ["imatrix"]
    info = {"imatrix": {"calibration": "layer-loss", "units": "calibration-loss increase (nats/token)"}}
    if snr:
        info["snr"] = {"calibration": "none", "units": "layer-local proxy"}
    meta = {
        "bits": BITS,
        "group_size": 64,
        "estimators": ests,
        "mix": {"imatrix": 1.0},
        "estimator_info": info,
        "model_name": "synthetic/llama-toy",
    }
    return SensitivityTable(df=pd.concat(frames, ignore_index=True), meta=meta)


def _check_png(path: str) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[:2] == (9 * 120, 12 * 120)
    assert img.shape[2] in (3, 4)
    assert float(np.std(img[..., :3])) > 0.05  # not a blank canvas


def _no_temp(folder) -> None:
    assert sorted(os.listdir(folder)) == ["sens.png"]


def test_layer_block_and_type():
    assert layer_block_and_type("model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert layer_block_and_type("model.layers.3.mlp.down_proj") == (3, "down_proj")
    assert layer_block_and_type("gpt_neox.layers.0.attention.query_key_value") == (0, "query_key_value")
    assert layer_block_and_type("model.decoder.layers.1.fc1") == (1, "fc1")
    assert layer_block_and_type("transformer.h.11.attn.c_attn") == (11, "c_attn")
    assert layer_block_and_type("lm_head") == (None, "lm_head")
    assert layer_block_and_type("model.embed_tokens") == (None, "embed_tokens")
    assert layer_block_and_type("model.layers_norm.weight") == (None, "weight")


@pytest.mark.parametrize("snr", [True, False])
def test_plot_writes_png(tmp_path, snr):
    out = str(tmp_path / "sens.png")
    assert plot_sensitivity(make_table(snr=snr), out) == out
    _check_png(out)
    _no_temp(tmp_path)


def test_plot_estimator_and_width(tmp_path):
    out = str(tmp_path / "sens.png")
    plot_sensitivity(make_table(), out, estimator="snr", width=4)
    _check_png(out)
    _no_temp(tmp_path)


def test_plot_default_width_without_2(tmp_path):
    t = make_table()
    t.meta["bits"] = [0, 3, 4, 8]
    out = str(tmp_path / "sens.png")
    plot_sensitivity(t, out)  # falls back to 3 bits
    _check_png(out)


def test_errors(tmp_path):
    t = make_table(snr=False)
    out = str(tmp_path / "sens.png")
    with pytest.raises(BitsearchError, match="estimator 'fisher'"):
        plot_sensitivity(t, out, estimator="fisher")
    with pytest.raises(BitsearchError, match="width 5"):
        plot_sensitivity(t, out, width=5)
    assert os.listdir(tmp_path) == []


LLAMA_TYPES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def test_plot_many_blocks(tmp_path):
    """A 24-block llama-like table with lm_head: unannotated heatmap, seven types."""
    out = str(tmp_path / "sens.png")
    plot_sensitivity(make_table(n_blocks=24, channels=32, types=LLAMA_TYPES), out)
    _check_png(out)
    _no_temp(tmp_path)
