"""Plan file: round trip, atomic write, and a named error for every kind of bad file."""

import json
import os

import numpy as np
import pytest

from bitsearch.errors import BitsearchError
from bitsearch.io.plan import BitPlan, decode_bits, encode_bits


def make_plan() -> BitPlan:
    model = {
        "model_type": "llama",
        "sha256": "ab" * 32,
        "config_sha256": "cd" * 32,
        "targets": {"a": [4, 16], "b": [3, 8]},
    }
    p = BitPlan(
        model=model,
        group_size=8,
        menu=[0, 2, 3, 4, 8, 16],
        bits={"a": np.array([0, 2, 3, 16], dtype=np.uint8), "b": np.array([8, 4, 4], dtype=np.uint8)},
    )
    p.fill_summary(predicted_error=0.5)
    return p


def test_encode_decode():
    bits = np.array([0, 2, 3, 4, 5, 6, 7, 8, 16], dtype=np.uint8)
    assert encode_bits(bits) == "02345678F"
    assert np.array_equal(decode_bits("02345678F", "x"), bits)


def test_round_trip(tmp_path):
    p = make_plan()
    path = str(tmp_path / "plan.json")
    p.save(path)
    q = BitPlan.load(path)
    assert q.summary == p.summary and q.group_size == 8
    assert all(np.array_equal(q.bits[k], p.bits[k]) for k in p.bits)
    assert q.summary["pruned_channels"] == 1
    # exact bytes: a (K=16, 2 groups): 0 + (4+2*3) + (6+2*3) + 2*16; b (K=8): (8+3) + 2*(4+3); bit map 7
    assert q.n_bytes() == 10 + 12 + 32 + 11 + 14 + 7
    assert [f for f in os.listdir(tmp_path)] == ["plan.json"]  # no temporary left behind


def _write(tmp_path, d) -> str:
    path = str(tmp_path / "bad.json")
    with open(path, "w") as f:
        f.write(d if isinstance(d, str) else json.dumps(d))
    return path


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(version=3), "format version 3"),
        (lambda d: d.update(couplings=[{"kind": "mlp"}]), "couplings section is malformed"),
        (
            lambda d: d.update(
                couplings=[
                    {
                        "kind": "mlp",
                        "producers": ["a", "x"],
                        "consumer": "b",
                        "unit_rows": [1, 1],
                        "unit_cols": 1,
                        "n_units": 4,
                    }
                ]
            ),
            "coupling names 'x'",
        ),
        (
            lambda d: d.update(
                couplings=[
                    {"kind": "mlp", "producers": ["a"], "consumer": "b", "unit_rows": [1], "unit_cols": 1, "n_units": 4}
                ]
            ),
            "does not fit the layer shapes",
        ),
        (lambda d: d.update(format="other"), "not a bitsearch plan"),
        (lambda d: d["bits"].update(c="22"), "layer 'c' has bits but is not among its targets"),
        (lambda d: d["bits"].update(a="0237"), "channel 3 has width 7, outside the menu"),
        (lambda d: d["bits"].update(a="02X4"), "width code 'X'"),
        (lambda d: d["bits"].update(a="02"), "has 2 widths for 4 channels"),
        (lambda d: d["summary"].update(bytes=1), "summary says 1 bytes"),
        (lambda d: d["quantizer"].update(group_size=0), "group size 0"),
        (lambda d: d.pop("bits"), "lacks its 'bits' section"),
    ],
)
def test_bad_plans_name_the_problem(tmp_path, mutate, message):
    d = make_plan().to_dict()
    d["bits"]["a"] = "0238"
    d["quantizer"]["bits"] = [0, 2, 3, 4, 8, 16]
    d["summary"]["bytes"] = None
    d["summary"]["bytes"] = BitPlan.from_dict(json.loads(json.dumps(d))).n_bytes()
    mutate(d)
    with pytest.raises(BitsearchError, match=message):
        BitPlan.load(_write(tmp_path, d))


def test_truncated_and_missing(tmp_path):
    p = make_plan()
    path = str(tmp_path / "plan.json")
    p.save(path)
    text = open(path).read()
    with pytest.raises(BitsearchError, match="truncated or not JSON"):
        BitPlan.load(_write(tmp_path, text[: len(text) // 2]))
    with pytest.raises(BitsearchError, match="does not exist"):
        BitPlan.load(str(tmp_path / "nope.json"))


def test_check_model():
    p = make_plan()
    fp = dict(p.model)
    p.check_model(fp)
    with pytest.raises(BitsearchError, match="layer 'b' is not a target"):
        p.check_model(dict(fp, targets={"a": [4, 16]}))
    with pytest.raises(BitsearchError, match="is 4x16 in the plan but 5x16"):
        p.check_model(dict(fp, targets={"a": [5, 16], "b": [3, 8]}))
    with pytest.raises(BitsearchError, match="made for another model"):
        p.check_model(dict(fp, sha256="ff" * 32))
