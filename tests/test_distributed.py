"""``torchrun --nproc_per_node 2 -m bitsearch sensitivity`` (gloo, CPU) writes the table a
single process writes, up to floating-point summation order."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bitsearch.sensitivity import SensitivityTable

ARGS = [
    "--samples",
    "6",
    "--seq-len",
    "24",
    "--group-size",
    "16",
    "--calib-loss-samples",
    "4",
    "--micro-batch",
    "1",
    "--bits",
    "0,2,3,4,8",
    "--probes",
    "2",
    "--quiet",
]


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_torchrun_two_processes_match_one(llama_dir, text_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", BITSEARCH_NO_PROGRESS="1")
    est = "imatrix,snr,fisher,hutchinson"
    common = ["sensitivity", "--model", llama_dir, "--calib", text_file, "--estimators", est] + ARGS
    one, two = str(tmp_path / "one.parquet"), str(tmp_path / "two.parquet")
    _run([sys.executable, "-m", "bitsearch"] + common + ["--out", one], env)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bitsearch"]
        + common
        + ["--out", two],
        env,
    )
    a, b = SensitivityTable.load(one), SensitivityTable.load(two)
    assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    assert list(a.df.columns) == list(b.df.columns)
    for col in a.df.columns:
        if col in ("layer",):
            assert (a.df[col] == b.df[col]).all()
            continue
        np.testing.assert_allclose(
            b.df[col].to_numpy(float), a.df[col].to_numpy(float), rtol=2e-4, atol=1e-12, err_msg=col
        )
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left
