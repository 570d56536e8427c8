"""The CLI: every user mistake gives one line on stderr, exit code 2, no traceback, no file."""

import json
import os
import subprocess
import sys

import pytest

from bitsearch.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bitsearch: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def made(tiny_models, text_file, tmp_path_factory):
    """A table and a plan for the tiny llama, made through the CLI."""
    d = tmp_path_factory.mktemp("cli")
    m = tiny_models["llama"]
    common = ["--samples", "4", "--seq-len", "32", "--group-size", "16", "--calib-loss-samples", "2"]
    assert (
        main(["--quiet", "sensitivity", "--model", m, "--calib", text_file, "--out", str(d / "t.parquet")] + common)
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
                "4.5",
                "--group-size",
                "16",
                "--out",
                str(d / "p.json"),
            ]
        )
        == 0
    )
    return {"dir": d, "model": m, "table": str(d / "t.parquet"), "plan": str(d / "p.json"), "text": text_file}


def test_happy_path_prints_summary(made, capsys):
    code, out, err = run_cli(
        capsys,
        "--quiet",
        "apply",
        "--model",
        made["model"],
        "--plan",
        made["plan"],
        "--out",
        str(made["dir"] / "packed"),
    )
    assert code == 0 and "bytes of packed target tensors" in out
    code, out, _ = run_cli(
        capsys,
        "--quiet",
        "eval",
        "--model",
        str(made["dir"] / "packed"),
        "--text",
        made["text"],
        "--max-tokens",
        "200",
        "--seq-len",
        "50",
        "--json",
        str(made["dir"] / "e.json"),
    )
    assert code == 0 and out.startswith("ppl ")
    assert set(json.load(open(made["dir"] / "e.json"))) == {"ppl", "nll", "entropy", "tokens", "seq_len", "model"}


def test_bad_inputs(made, capsys, tmp_path, tiny_models):
    m, table, plan, text = made["model"], made["table"], made["plan"], made["text"]
    out = str(tmp_path / "x.json")
    cases = [
        (
            ["search", "--model", m, "--sensitivity", table, "--budget", "0.01", "--group-size", "16", "--out", out],
            r"below the smallest feasible one .* \d+ bytes \(\d\.\d+ bits\)",
        ),
        (
            [
                "search",
                "--model",
                m,
                "--sensitivity",
                table,
                "--budget",
                "3",
                "--group-size",
                "16",
                "--min-bits",
                "2",
                "--budget",
                "1.0",
                "--out",
                out,
            ],
            r"smallest feasible one with widths >= 2",
        ),
        (
            ["search", "--model", m, "--sensitivity", table, "--budget", "lots", "--group-size", "16", "--out", out],
            r"budget 'lots'",
        ),
        (
            ["search", "--model", m, "--sensitivity", table, "--budget", "3", "--group-size", "128", "--out", out],
            r"--group-size 128 differs from the sensitivity table's 16",
        ),
        (
            [
                "search",
                "--model",
                m,
                "--sensitivity",
                table,
                "--budget",
                "3",
                "--bits",
                "2,9",
                "--group-size",
                "16",
                "--out",
                out,
            ],
            r"width 9 is not in the menu",
        ),
        (["search", "--model", m, "--budget", "3", "--out", out], r"needs --calib"),
        (
            [
                "search",
                "--model",
                tiny_models["qwen2"],
                "--sensitivity",
                table,
                "--budget",
                "3",
                "--group-size",
                "16",
                "--out",
                out,
            ],
            r"computed for another model",
        ),
        (
            ["sensitivity", "--model", str(tmp_path / "nomodel"), "--calib", text, "--out", out],
            r"model directory .* does not exist",
        ),
        (
            ["sensitivity", "--model", m, "--calib", str(tmp_path / "none.txt"), "--out", out],
            r"text file .* does not exist",
        ),
        (["sensitivity", "--model", m, "--calib", text, "--seq-len", "100000", "--out", out], r"fewer than --seq-len"),
        (
            ["sensitivity", "--model", m, "--calib", text, "--targets", "nothing_matches", "--out", out],
            r"no target layers match",
        ),
        (["sensitivity", "--model", m, "--calib", text, "--targets", "(", "--out", out], r"not a valid regex"),
        (
            [
                "sensitivity",
                "--model",
                m,
                "--calib",
                text,
                "--estimators",
                "magic",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                out,
            ],
            r"unknown estimator 'magic'",
        ),
        (["sensitivity", "--model", m, "--calib", text, "--dtype", "float7", "--out", out], r"unknown dtype"),
        (
            [
                "sensitivity",
                "--model",
                m,
                "--calib",
                text,
                "--estimators",
                "imatrix,fisher",
                "--mix",
                "snr=1",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                out,
            ],
            r"mix names estimator 'snr'",
        ),
        (
            [
                "sensitivity",
                "--model",
                m,
                "--calib",
                text,
                "--estimators",
                "fisher",
                "--offload",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                out,
            ],
            r"--offload .* not fisher",
        ),
        (
            [
                "sensitivity",
                "--model",
                m,
                "--calib",
                text,
                "--estimators",
                "hutchinson",
                "--probes",
                "0",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                out,
            ],
            r"--probes must be at least 1",
        ),
        (
            [
                "sensitivity",
                "--model",
                m,
                "--calib",
                text,
                "--targets",
                "lm_head",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--out",
                out,
            ],
            r"target the embedding instead",
        ),
        (
            [
                "search",
                "--model",
                m,
                "--sensitivity",
                table,
                "--budget",
                "3",
                "--group-size",
                "16",
                "--mix",
                "fisher",
                "--out",
                out,
            ],
            r"mix names estimator 'fisher'",
        ),
        (
            ["plot", "sensitivity", "--table", table, "--estimator", "fisher", "--out", str(tmp_path / "p.png")],
            r"estimator 'fisher'",
        ),
        (["apply", "--model", m, "--plan", str(tmp_path / "none.json"), "--out", out], r"does not exist"),
        (
            ["apply", "--model", tiny_models["qwen2"], "--plan", plan, "--out", str(tmp_path / "o")],
            r"made for another model|not a target layer|in the plan but",
        ),
        (["eval", "--model", m, "--text", str(tmp_path / "none.txt")], r"does not exist"),
        (["eval", "--model", m, "--text", text, "--seq-len", "1"], r"--seq-len must be at least 2"),
    ]
    for argv, pattern in cases:
        code, _, err = run_cli(capsys, "--quiet", *argv)
        assert_one_line_error(code, err, pattern)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "o")


def test_search_takes_the_tables_group_size_when_none_is_given(made, capsys, tmp_path):
    from bitsearch.io.plan import BitPlan

    out = str(tmp_path / "p.json")
    paths = ["--model", made["model"], "--sensitivity", made["table"], "--out", out]
    code, _, err = run_cli(capsys, "--quiet", "search", "--budget", "4.5", *paths)
    assert code == 0, err
    plan, ref = BitPlan.load(out), BitPlan.load(made["plan"])  # ref: made with --group-size 16
    assert plan.group_size == ref.group_size == 16
    assert plan.n_bytes() == ref.n_bytes()
    assert all((plan.bits[n] == ref.bits[n]).all() for n in ref.bits)


def test_truncated_plan_via_cli(made, capsys, tmp_path):
    bad = tmp_path / "trunc.json"
    bad.write_text(open(made["plan"]).read()[:200])
    code, _, err = run_cli(capsys, "apply", "--model", made["model"], "--plan", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, r"truncated or not JSON")


def test_hf_calibration_offline_is_one_line(made, capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "--quiet",
        "sensitivity",
        "--model",
        made["model"],
        "--calib",
        "hf:no_such_dataset_xyz:train",
        "--out",
        str(tmp_path / "t.parquet"),
    )
    assert_one_line_error(code, err, r"datasets|cannot load dataset")


def test_console_script_entry():
    r = subprocess.run([sys.executable, "-m", "bitsearch", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for sub in ["demo", "sensitivity", "search", "apply", "eval", "plot"]:
        assert sub in r.stdout


def test_bad_budget_refused_before_the_sensitivity_pass(made, capsys, tmp_path, monkeypatch):
    """Without a precomputed table, a budget that does not parse or cannot fit is refused at once,
    not after the minutes of sensitivity pass (which here would fail the test)."""
    import bitsearch.api

    def no_pass(*a, **kw):
        raise AssertionError("the sensitivity pass ran")

    monkeypatch.setattr(bitsearch.api, "sensitivity", no_pass)
    out = str(tmp_path / "x.json")
    common = [
        "--quiet",
        "search",
        "--model",
        made["model"],
        "--calib",
        made["text"],
        "--group-size",
        "16",
        "--out",
        out,
    ]
    for budget, pattern in [
        ("lots", r"budget 'lots' is neither"),
        ("1.0", r"below the smallest feasible one with widths >= 2: \d+ bytes"),
        ("0.001MB", r"budget 1000 bytes .* below the smallest feasible one"),
    ]:
        code, _, err = run_cli(capsys, *common, "--budget", budget)
        assert_one_line_error(code, err, pattern)
    code, _, err = run_cli(capsys, *common, "--budget", "1.0", "--min-bits", "9")
    assert_one_line_error(code, err, r"no width of the menu lies in \[--min-bits 9")
    # with pruning allowed, only the bit map must fit: this budget passes the early check
    with pytest.raises(AssertionError, match="the sensitivity pass ran"):
        main(common + ["--budget", "1.0", "--min-bits", "0"])
    assert not os.path.exists(out)
