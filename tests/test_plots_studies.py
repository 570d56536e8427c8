"""The figures the studies and analysis draw through bitsearch.plots: each writes a PNG of the
expected size from synthetic rows (skipped points left out), and refuses empty input."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from bitsearch.errors import BitsearchError
from bitsearch.plots import plot_confidence, plot_layer_bits, plot_methods, plot_runs, plot_stage_costs


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_methods_figure_leaves_out_skipped_and_missing_points(tmp_path):
    rows = [
        {"method": "bitsearch-qat", "avg_bits": 2.5, "ppl": 230.0},
        {"method": "bitsearch-qat", "avg_bits": 3.0, "ppl": 226.0},
        {"method": "gptq", "avg_bits": 2.4, "ppl": 260.0},
        {"method": "gptq", "avg_bits": 3.0, "skipped": "no configuration fits"},  # no ppl: must be left out
        {"method": "hqq", "missing": True},
    ]
    out = plot_methods(
        rows,
        {"ppl": 224.0},
        str(tmp_path / "m.png"),
        labels={"gptq": "GPTQ"},
        colors={"gptq": "tab:green"},
        highlight="bitsearch-qat",
    )
    assert out == str(tmp_path / "m.png") and png_size(out) == (960, 660)


def test_confidence_figure(tmp_path):
    curve = [{"T": t, "ppl": 224.0 * (1 + 0.1 * (t - 1) ** 2), "entropy": 4.0 + (t - 1)} for t in (0.9, 1.0, 1.1)]
    rows = [
        {"family": "peer", "ppl": 240.0, "entropy": 4.1, "eval_kl": 0.08},
        {"family": "bitsearch", "ppl": 232.0, "entropy": 4.05, "eval_kl": 0.05},
    ]
    out = plot_confidence(curve, rows, {"ppl": 224.0, "entropy": 4.0}, str(tmp_path / "c.png"))
    assert png_size(out) == (900, 600)


def test_runs_figure_one_panel_per_plan(tmp_path):
    runs = [
        {"plan": p, "run": r, "ppl": 230.0 + k, "avg_bits": b}
        for p, b in (("w4", 4.25), ("mixed2.5", 2.5))
        for k, r in enumerate(("RTN", "SignRound", "QAT tiled"))
    ]
    out = plot_runs(runs, str(tmp_path / "r.png"), baseline="RTN", color_of=lambda run: "tab:orange")
    assert png_size(out) == (1440, 540)  # two panels of 6 x 4.5 inches at 120 dpi
    with pytest.raises(BitsearchError, match="no runs"):
        plot_runs([], str(tmp_path / "none.png"))


def test_stage_cost_figure(tmp_path):
    ratios = {
        ("sens_imatrix", "tiny 2x32"): 3.0,
        ("search_greedy", "tiny 2x32"): 0.2,
        ("sens_imatrix", "tiny 4x32"): 2.5,
    }
    out = plot_stage_costs(ratios, str(tmp_path / "s.png"), title="stage cost")
    assert png_size(out) == (960, 600)
    with pytest.raises(BitsearchError, match="no stage costs"):
        plot_stage_costs({}, str(tmp_path / "none.png"))


def test_layer_bits_figure(tmp_path):
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(40)]
    out = plot_layer_bits(layers, [2.0 + 0.05 * i for i in range(40)], str(tmp_path / "l.png"), title="plan.json")
    assert png_size(out) == (792, 440)  # 40 x 0.18 = 7.2 x 4 inches at 110 dpi
    with pytest.raises(BitsearchError, match="no layers"):
        plot_layer_bits([], [], str(tmp_path / "none.png"))
