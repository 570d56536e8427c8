"""The output, input and interruption contract, one case each: every bad input or interruption
gives one line on stderr, a non-zero exit (130 for Ctrl-C), no traceback, and leaves every file
that was there before byte-identical."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import stat

import pytest
import torch

from bitsearch.cli import main

#: calibration and grid small enough for the tiny test model
SMALL = ["--samples", "4", "--seq-len", "32", "--group-size", "16", "--loss-calibration-samples", "2"]


def snapshot(*roots) -> dict[str, str]:
    """Path -> sha256 of every file under ``roots`` (what must stay byte-identical)."""
    out = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                p = os.path.join(folder, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_line(capsys, argv, pattern, code=2, roots=()):
    before = snapshot(*roots)
    got = main(["--quiet", *argv])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    after = snapshot(*roots)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    return lines[0], after.keys() - before.keys()


@pytest.fixture(scope="module")
def made(llama_dir, text_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    model = str(d / "model")
    shutil.copytree(llama_dir, model)
    plan = str(d / "plan.json")
    assert (
        main(
            [
                "--quiet",
                "search",
                "--model",
                model,
                "--calib",
                text_file,
                "--budget",
                "4.5",
                *SMALL,
                "--out",
                plan,
            ]
        )
        == 0
    )
    return {"dir": d, "model": model, "plan": plan, "text": text_file}


def test_apply_never_replaces_the_source_model(made, capsys, monkeypatch):
    monkeypatch.setattr(
        importlib.import_module("bitsearch.quantize"),
        "pack_model",
        lambda *a, **k: pytest.fail("computed before refusing"),
    )
    for extra in ([], ["--overwrite"]):
        one_line(
            capsys,
            ["apply", "--model", made["model"], "--plan", made["plan"], "--out", made["model"], *extra],
            r"is \(or holds\) .* an input of this command",
            roots=[made["dir"]],
        )
    # nor a folder that holds the plan it reads
    one_line(
        capsys,
        ["apply", "--model", made["model"], "--plan", made["plan"], "--out", str(made["dir"]), "--overwrite"],
        r"an input of this command",
        roots=[made["dir"]],
    )


def test_existing_outputs_need_overwrite(made, capsys, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    one_line(
        capsys,
        ["apply", "--model", made["model"], "--plan", made["plan"], "--out", str(full)],
        r"exists and is not empty: pass --overwrite",
        roots=[tmp_path],
    )
    plan_copy = tmp_path / "p.json"
    plan_copy.write_text("not a plan of ours")
    one_line(
        capsys,
        ["search", "--model", made["model"], "--calib", made["text"], "--budget", "4", "--out", str(plan_copy)],
        r"exists: pass --overwrite",
        roots=[tmp_path],
    )
    # with --overwrite the folder is replaced, atomically, by the packed model
    assert (
        main(["--quiet", "apply", "--model", made["model"], "--plan", made["plan"], "--out", str(full), "--overwrite"])
        == 0
    )
    assert not (full / "keep.txt").exists() and (full / "bitsearch_quant.json").exists()


def test_output_paths_of_the_wrong_kind(made, capsys, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    one_line(
        capsys,
        ["search", "--model", made["model"], "--calib", made["text"], "--budget", "4", "--out", str(folder)],
        r"is a folder; give a file path",
        roots=[tmp_path],
    )
    one_line(
        capsys,
        ["apply", "--model", made["model"], "--plan", made["plan"], "--out", "."],
        r"current folder",
        roots=[tmp_path],
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(
        capsys,
        ["apply", "--model", made["model"], "--plan", made["plan"], "--out", str(afile / "sub")],
        r"is a file, not a folder",
        roots=[tmp_path],
    )
    one_line(
        capsys,
        ["apply", "--model", made["model"], "--plan", made["plan"], "--out", "/proc/no/such"],
        r"cannot write",
        roots=[tmp_path],
    )


def test_outputs_follow_the_umask(made, tmp_path):
    old = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "--quiet",
                    "apply",
                    "--model",
                    made["model"],
                    "--plan",
                    made["plan"],
                    "--out",
                    str(tmp_path / "packed"),
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
                    made["model"],
                    "--calib",
                    made["text"],
                    "--budget",
                    "4",
                    *SMALL,
                    "--out",
                    str(tmp_path / "p.json"),
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "packed").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "p.json").st_mode) == 0o644


@pytest.fixture(scope="module")
def nan_model(llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(tmp_path_factory.mktemp("nan") / "m")
    m = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(d)
    return d


def test_nan_weights_are_named_at_every_stage(made, nan_model, capsys, tmp_path):
    pattern = r"weight 'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 NaN"
    for argv in (
        ["sensitivity", "--model", nan_model, "--calib", made["text"], "--out", str(tmp_path / "t.parquet")],
        ["apply", "--model", nan_model, "--plan", made["plan"], "--out", str(tmp_path / "o"), "--force"],
        ["eval", "--model", nan_model, "--text", made["text"]],
        [
            "finalize",
            "--model",
            nan_model,
            "--plan",
            made["plan"],
            "--calib",
            made["text"],
            "--out",
            str(tmp_path / "f"),
            "--force",
        ],
    ):
        _, new = one_line(capsys, argv, pattern, roots=[tmp_path])
        assert not new


def test_a_plan_for_other_weights_needs_force(made, tiny_models, capsys, tmp_path, tokenizer_dir):
    from conftest import build_tiny_model

    other = build_tiny_model("llama", str(tmp_path / "other"), tokenizer_dir, seed=1)  # same shapes
    one_line(
        capsys,
        ["apply", "--model", other, "--plan", made["plan"], "--out", str(tmp_path / "o")],
        r"same shapes but other weights .*pass --force",
        roots=[tmp_path],
    )
    assert (
        main(["--quiet", "apply", "--model", other, "--plan", made["plan"], "--out", str(tmp_path / "o"), "--force"])
        == 0
    )


def test_sequence_lengths_and_short_texts(made, tiny_models, capsys, tmp_path):
    one_line(
        capsys,
        [
            "sensitivity",
            "--model",
            made["model"],
            "--calib",
            made["text"],
            "--seq-len",
            "300",
            "--samples",
            "2",
            "--out",
            str(tmp_path / "t.parquet"),
        ],
        r"--seq-len 300 exceeds the model's 256 positions",
        roots=[tmp_path],
    )
    line, _ = one_line(
        capsys,
        [
            "sensitivity",
            "--model",
            made["model"],
            "--calib",
            made["text"],
            "--seq-len",
            "200",
            "--samples",
            "500",
            "--out",
            str(tmp_path / "t.parquet"),
        ],
        r"(\d+) windows of 200 fit without overlap, 500 asked; use --samples \1 or fewer "
        r"\(or --allow-overlap\)",
        roots=[tmp_path],
    )
    # eval at the default 512 tokens on a model of 256 positions: windows of 256, with a note
    assert main(["--quiet", "eval", "--model", tiny_models["opt"], "--text", made["text"], "--max-tokens", "600"]) == 0
    captured = capsys.readouterr()
    assert "windows of 256" in captured.err and "seq_len 256" in captured.out


def test_budgets(made, capsys, tmp_path, monkeypatch):
    models = importlib.import_module("bitsearch.io.loading")
    one_line(
        capsys,
        [
            "search",
            "--model",
            made["model"],
            "--sensitivity",
            str(made["dir"] / "none.parquet"),
            "--budget",
            "0.5",
            "--out",
            str(tmp_path / "p.json"),
            "--calib",
            made["text"],
            *SMALL,
        ],
        r"does not exist",
        roots=[tmp_path],
    )
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the budget"))
    one_line(
        capsys,
        [
            "search",
            "--model",
            made["model"],
            "--calib",
            made["text"],
            "--budget",
            "abc",
            "--out",
            str(tmp_path / "p.json"),
        ],
        r"budget 'abc' is neither",
        roots=[tmp_path],
    )
    monkeypatch.undo()
    one_line(
        capsys,
        [
            "search",
            "--model",
            made["model"],
            "--calib",
            made["text"],
            "--budget",
            "1.0",
            "--out",
            str(tmp_path / "p.json"),
            "--group-size",
            "16",
        ],
        r"allow pruning with --min-bits 0",
        roots=[tmp_path],
    )
    assert (
        main(
            [
                "--quiet",
                "search",
                "--model",
                made["model"],
                "--calib",
                made["text"],
                "--budget",
                "12",
                *SMALL,
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "more than the widest plan needs" in captured.err
    assert set(json.load(open(tmp_path / "p.json"))["summary"]["histogram"]) == {"8"}


def test_conv1d_models_are_named(capsys, tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=320)
    d = str(tmp_path / "gpt2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("word " * 2000)
    one_line(
        capsys,
        [
            "sensitivity",
            "--model",
            d,
            "--calib",
            str(text),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path / "t.parquet"),
        ],
        r"Conv1D .*'transformer\.h\.0\.attn\.c_attn'",
        roots=[tmp_path],
    )


def test_ctrl_c_during_optuna_is_one_line_and_resumable(made, capsys, tmp_path, monkeypatch):
    from bitsearch.search import kl

    monkeypatch.setattr(kl.PlanKL, "__call__", lambda self, bits: (_ for _ in ()).throw(KeyboardInterrupt()))
    line, new = one_line(
        capsys,
        [
            "search",
            "--model",
            made["model"],
            "--calib",
            made["text"],
            "--budget",
            "4.5",
            "--method",
            "optuna",
            "--n-trials",
            "2",
            "--kl-samples",
            "2",
            *SMALL,
            "--out",
            str(tmp_path / "p.json"),
        ],
        r"interrupted: the study's finished trials are kept in .*p\.optuna\.journal.*--resume",
        code=130,
        roots=[tmp_path],
    )
    assert not (tmp_path / "p.json").exists()


def test_ctrl_c_in_finalize_keeps_its_checkpoint_and_a_rerun_does_not_overwrite_it(made, capsys, tmp_path, monkeypatch):
    train = importlib.import_module("bitsearch.finalize.train")
    signround = importlib.import_module("bitsearch.finalize.signround")
    interrupt = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())  # noqa: E731
    out = str(tmp_path / "f")
    argv = [
        "finalize",
        "--model",
        made["model"],
        "--plan",
        made["plan"],
        "--calib",
        made["text"],
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        out,
        "--signround-steps",
        "2",
    ]
    # during the default's SignRound nothing is on disk yet, and the message says so
    monkeypatch.setattr(signround, "signround", interrupt)
    one_line(capsys, argv, r"interrupted: nothing was written", code=130, roots=[tmp_path])
    monkeypatch.undo()
    # during QAT the checkpoint holds SignRound's rounding from the first step on
    monkeypatch.setattr(train._Trainer, "update", interrupt)
    _, new = one_line(
        capsys,
        argv,
        r"interrupted: QAT progress is kept in .*f\.qat-checkpoint\.pt.*--resume",
        code=130,
        roots=[tmp_path],
    )
    monkeypatch.undo()
    assert {os.path.basename(f) for f in new} == {"f.qat-checkpoint.pt"}
    one_line(
        capsys, argv, r"checkpoint of an earlier run .*pass --resume to continue it or --overwrite", roots=[tmp_path]
    )
