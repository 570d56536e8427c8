"""studies/scale.py: every requested stage gets a row with finite positive ratios to forward+backward."""

import math

import pandas as pd
import pytest

STAGES = [
    "sens_imatrix",
    "sens_hutchinson",
    "search_greedy",
    "search_optuna",
    "finalize_qat_tiled",
    "finalize_signround",
    "apply",
    "eval_packed",
]


def test_scale_study_tiny(tmp_path):
    import torch

    from studies import scale

    threads = torch.get_num_threads()
    try:
        rows = scale.main(
            [
                "--shapes",
                "tiny",
                "--tokens",
                "2x32",
                "--stages",
                ",".join(STAGES),
                "--budget",
                "3",
                "--trials",
                "2",
                "--unit-repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    df = pd.read_csv(tmp_path / "scale.csv")
    assert len(rows) == len(df) == len(STAGES) + 1  # the unit row, then one row per stage
    assert list(df["stage"]) == ["fwd_bwd"] + STAGES
    assert df["error"].isna().all(), df.loc[df["error"].notna(), ["stage", "error"]].to_string()
    assert (df["shape"] == "tiny").all() and (df["tokens"] == 64).all() and (df["layers"] == 2).all()
    for r in df.itertuples():
        assert math.isfinite(r.ratio_time) and r.ratio_time > 0, r.stage
        assert math.isfinite(r.seconds) and r.seconds > 0, r.stage
        assert r.ratio_time == pytest.approx(r.seconds / r.fwd_bwd_seconds)
        if not pd.isna(r.ratio_mem):
            assert math.isfinite(r.ratio_mem) and r.ratio_mem >= 0, r.stage
    per = df.set_index("stage")
    assert per.loc["sens_hutchinson", "units"] == 2 and per.loc["search_optuna", "units"] == 2
    assert per.loc["finalize_signround", "units"] == 4 * 2  # steps per block x blocks
    assert per.loc["search_optuna", "ratio_time_per_unit"] == pytest.approx(per.loc["search_optuna", "ratio_time"] / 2)
    assert (tmp_path / "scale.json").is_file() and (tmp_path / "scale.png").is_file()
    assert not (tmp_path / "tmp").exists()  # temporary tables and checkpoints are gone


def test_failed_stage_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from studies import scale

    def boom(self, est):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(scale.Run, "sens", boom)
    rows = scale.main(
        [
            "--shapes",
            "tiny",
            "--tokens",
            "2x16",
            "--stages",
            "sens_fisher,search_greedy",
            "--budget",
            "3",
            "--unit-repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    by = {r["stage"]: r for r in rows}
    assert by["sens_fisher"]["error"].startswith("RuntimeError: CUDA out of memory")
    assert by["search_greedy"].get("error") is None and by["search_greedy"]["ratio_time"] > 0
    assert "failed" in scale.markdown(rows)
