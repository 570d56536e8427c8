"""`bitsearch demo` on the bundled model and texts (offline, small)."""

import os

import pandas as pd
import pytest

from bitsearch.cli import main
from bitsearch.demo import DEMO_SETTINGS, demo_paths


def test_bundled_assets_present_and_small():
    paths = demo_paths()
    total = sum(
        os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.dirname(paths["calib"])) for f in fs
    )
    assert total <= 9 * 2**20
    assert os.path.getsize(os.path.join(paths["model"], "model.safetensors")) <= 8 * 2**20


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(DEMO_SETTINGS, "eval_max_tokens", 2048)
    out = tmp_path / "demo"
    assert main(["--quiet", "demo", "--out", str(out), "--budgets", "2.5,3.5"]) == 0
    df = pd.read_csv(out / "results.csv")
    assert list(df["method"]) == ["greedy", "greedy", "uniform", "uniform", "uniform"]
    assert (df["bytes"] == df["plan_bytes"]).all()
    assert (df.loc[df.method == "greedy", "avg_bits"] <= [2.5, 3.5]).all()
    assert (out / "ppl_vs_bits.png").stat().st_size > 10_000
    assert (out / "plan_greedy_2.50.json").is_file()
    assert "float ppl" in capsys.readouterr().out
