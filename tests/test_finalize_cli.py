"""`bitsearch finalize` and coupled pruning through the CLI on the tiny Llama: written bytes equal
the plan's, the finalized model is closer to the float one than round-to-nearest, mistakes are
one line."""

from __future__ import annotations

import json

import pytest
from test_cli import assert_one_line_error, run_cli

from bitsearch.cli import main
from bitsearch.config import FinalizeConfig


@pytest.fixture(scope="module")
def made(tiny_models, text_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("fin")
    m = tiny_models["llama"]
    assert (
        main(
            [
                "--quiet",
                "sensitivity",
                "--model",
                m,
                "--calib",
                text_file,
                "--out",
                str(d / "t.parquet"),
                "--samples",
                "4",
                "--seq-len",
                "32",
                "--group-size",
                "16",
                "--calib-loss-samples",
                "2",
                "--bits",
                "0,2,3,4,8",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--quiet",
                "search",
                "--model",
                m,
                "--sensitivity",
                str(d / "t.parquet"),
                "--budget",
                "4.2",
                "--group-size",
                "16",
                "--out",
                str(d / "p.json"),
            ]
        )
        == 0
    )
    return {"dir": d, "model": m, "table": str(d / "t.parquet"), "plan": str(d / "p.json"), "text": text_file}


def _kl(capsys, made, model) -> float:
    out = str(made["dir"] / "e.json")
    code, _, _ = run_cli(
        capsys,
        "--quiet",
        "eval",
        "--model",
        model,
        "--text",
        made["text"],
        "--max-tokens",
        "600",
        "--seq-len",
        "60",
        "--reference",
        made["model"],
        "--json",
        out,
        "--overwrite",
    )
    assert code == 0
    return json.load(open(out))["kl"]


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the default: SignRound, then the step sizes end to end
        ["--method", "qat", "--mode", "e2e", "--init", "rtn", "--trainable", "all"]
        + ["--round", "sigmoid", "--temperature", "5", "--clamp", "soft"],
        [
            "--method",
            "qat",
            "--mode",
            "tiled+e2e",
            "--tile-size",
            "1",
            "--init",
            "signround",
            "--signround-steps",
            "10",
        ],
        ["--method", "signround", "--signround-steps", "20"],
        ["--method", "gptq", "--gptq-damp", "0.02"],
        ["--method", "signround", "--init", "gptq", "--signround-steps", "20"],
        ["--method", "qat", "--init", "gptq", "--mode", "tiled", "--tile-size", "1"],
        ["--method", "qat", "--init", "signround", "--signround-steps", "10", "--mode", "e2e", "--trainable", "scales"],
    ],
)
def test_finalize_beats_round_to_nearest(made, capsys, extra):
    d = made["dir"]
    code, _, _ = run_cli(
        capsys,
        "--quiet",
        "apply",
        "--model",
        made["model"],
        "--plan",
        made["plan"],
        "--out",
        str(d / "rtn"),
        "--overwrite",
    )
    assert code == 0
    out = str(d / ("fin-" + "-".join(extra[1::2])))
    code, stdout, err = run_cli(
        capsys,
        "--quiet",
        "finalize",
        "--model",
        made["model"],
        "--plan",
        made["plan"],
        "--calib",
        made["text"],
        "--samples",
        "16",
        "--seq-len",
        "32",
        "--steps",
        "30",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--out",
        out,
        *extra,
    )
    assert code == 0, err
    plan_bytes = json.load(open(made["plan"]))["summary"]["bytes"]
    assert f"{plan_bytes} bytes of packed target tensors (plan: {plan_bytes})" in stdout
    assert _kl(capsys, made, out) < _kl(capsys, made, str(d / "rtn"))


def test_finalize_data_free_and_mistakes(made, capsys, tmp_path):
    out = str(tmp_path / "df")
    code, stdout, err = run_cli(
        capsys,
        "--quiet",
        "finalize",
        "--model",
        made["model"],
        "--plan",
        made["plan"],
        "--data-free",
        "8",
        "--seq-len",
        "24",
        "--steps",
        "5",
        "--out",
        out,
    )
    assert code == 0, err
    meta = json.load(open(f"{out}/bitsearch_quant.json"))
    assert meta["plan_provenance"]["finalize"]["training_data"]["source"] == "data-free"
    assert list(tmp_path.glob("datafree-*.pt"))  # the cache lies next to the output
    base = ["finalize", "--model", made["model"], "--plan", made["plan"], "--out", str(tmp_path / "x")]
    for argv, pattern in [
        (base, r"give --calib FILE or --data-free N"),
        (base + ["--calib", made["text"], "--data-free", "4"], r"not both"),
        (base + ["--calib", made["text"], "--lr", "-1"], r"--lr and --beta must be positive"),
        (base + ["--calib", made["text"], "--resume"], r"no checkpoint"),
        (base + ["--calib", made["text"], "--method", "gptq", "--init", "signround"], r"gptq does not start from"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "x").exists()


def test_coupled_pruning_through_the_cli(made, capsys):
    d = made["dir"]
    plan = str(d / "pruned.json")
    code, stdout, _ = run_cli(
        capsys,
        "--quiet",
        "search",
        "--model",
        made["model"],
        "--sensitivity",
        made["table"],
        "--budget",
        "3.4",
        "--group-size",
        "16",
        "--min-bits",
        "0",
        "--out",
        plan,
    )
    assert code == 0 and "whole units: smaller matrices" in stdout
    p = json.load(open(plan))
    assert p["version"] == 2 and p["couplings"] and p["summary"]["dead_units"] > 0
    code, stdout, _ = run_cli(
        capsys, "--quiet", "apply", "--model", made["model"], "--plan", plan, "--out", str(d / "pruned")
    )
    assert code == 0 and f"{p['summary']['bytes']} bytes of packed target tensors" in stdout
    assert _kl(capsys, made, str(d / "pruned")) > 0
    code, _, err = run_cli(
        capsys, "finalize", "--model", made["model"], "--plan", plan, "--calib", made["text"], "--out", str(d / "nope")
    )
    assert_one_line_error(code, err, r"coupled pruning is not supported yet")


@pytest.mark.parametrize("mode", ["e2e", "tiled"])
def test_qat_after_signround_still_matches_the_float_model(made, tmp_path, mode):
    """QAT starting from SignRound's weights must distil from the float model, not from the
    SignRound model it starts as (which would make the first loss 0)."""
    from bitsearch import api

    finalized = api.finalize(
        made["model"],
        made["plan"],
        made["text"],
        FinalizeConfig(
            samples=8,
            seq_len=32,
            method="qat",
            init="signround",
            signround_steps=5,
            mode=mode,
            steps=1,
            lr=1e-12,
            batch_size=4,
            tile_size=1,
            show_progress=False,
        ),
        out=str(tmp_path / "o"),
    )
    phase = "e2e" if mode == "e2e" else "tiled"
    info = finalized.bitsearch_plan.provenance["finalize"]
    assert info["qat"]["first_loss"][phase] > 1e-4
