"""Sensitivity tables: several estimators, mixes, round trips, reading version 1."""

import os

import numpy as np
import pandas as pd
import pytest

from bitsearch.errors import BitsearchError
from bitsearch.sensitivity.table import SensitivityTable, parse_mix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_estimator_table():
    df = pd.DataFrame({"layer": ["a"] * 3 + ["b"] * 2, "channel": [0, 1, 2, 0, 1], "in_features": 8})
    rng = np.random.default_rng(0)
    for est in ("imatrix", "fisher"):
        for b in (0, 2, 4):
            df[f"{est}.e{b}"] = rng.uniform(0, 1, 5) / (b + 1)
    meta = {
        "bits": [0, 2, 4],
        "group_size": 8,
        "estimators": ["imatrix", "fisher"],
        "mix": {"imatrix": 0.5, "fisher": 0.5},
    }
    return SensitivityTable(df=df, meta=meta)


def test_mix_is_the_weighted_sum(tmp_path):
    t = two_estimator_table()
    a = t.df[["imatrix.e0", "imatrix.e2", "imatrix.e4"]].to_numpy()
    f = t.df[["fisher.e0", "fisher.e2", "fisher.e4"]].to_numpy()
    np.testing.assert_allclose(t.curves(), 0.5 * a + 0.5 * f)
    np.testing.assert_allclose(t.curves(mix="imatrix=0.2,fisher=3"), 0.2 * a + 3 * f)
    np.testing.assert_allclose(t.curves(mix="fisher"), f)
    np.testing.assert_allclose(t.curves(layer="b", mix="imatrix", bits=[4]), a[3:, 2:])
    path = str(tmp_path / "t.parquet")
    t.save(path)
    back = SensitivityTable.load(path)
    np.testing.assert_allclose(back.curves(mix="imatrix=1,fisher=1"), a + f)
    assert back.estimators == ["imatrix", "fisher"]


@pytest.mark.parametrize(
    "mix, msg",
    [
        ("snr", "lacks"),
        ("imatrix=x", "not a number"),
        ("imatrix=-1", ">= 0"),
        ("imatrix=0,fisher=0", "all zero"),
        (",", "empty"),
    ],
)
def test_bad_mixes(mix, msg):
    with pytest.raises(BitsearchError, match=msg):
        parse_mix(mix, ["imatrix", "fisher"])


def test_reads_version_1_tables():
    path = os.path.join(ROOT, "studies", "results", "slm_budget_table", "sensitivity.parquet")
    t = SensitivityTable.load(path)
    assert t.estimators == ["imatrix"]
    assert t.curves().shape == (len(t.df), len(t.bits))
    assert np.isfinite(t.curves()).all()
    assert t.metric("imatrix", "layer_response") is not None
