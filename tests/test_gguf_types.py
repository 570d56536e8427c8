"""ggml types, prices, fallbacks and per-tensor plan files (pure Python; the gguf package where noted)."""

from __future__ import annotations

import json

import pytest

from bitsearch.errors import BitsearchError
from bitsearch.gguf.plan import TensorPlan
from bitsearch.gguf.types import FALLBACK, GGML_TYPES, SEARCH_TYPES, effective_type, parse_types, tensor_bytes
from bitsearch.inputs import load_plan
from bitsearch.io.plan import BitPlan

# block size / bytes per block that the issue lists from ggml's type traits
LISTED = {
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_0": (32, 34),
    "IQ2_XXS": (256, 66),
    "IQ2_XS": (256, 74),
    "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98),
    "IQ3_S": (256, 110),
    "IQ4_XS": (256, 136),
    "F16": (1, 2),
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
}


def test_sizes_match_the_listed_ones_and_the_gguf_package():
    for name, (block, size) in LISTED.items():
        assert (GGML_TYPES[name].block, GGML_TYPES[name].type_size) == (block, size)
    gguf = pytest.importorskip("gguf")
    for t in GGML_TYPES.values():
        q = gguf.GGMLQuantizationType(t.id)
        assert q.name == t.name
        assert gguf.GGML_QUANT_SIZES[q] == (t.block, t.type_size)


def test_fallbacks_follow_llama_quantize():
    # rows of 384 (slm-llama-17m's width): 256-blocks fall back, 32-blocks stay
    assert effective_type("Q2_K", 384) == "Q4_0"
    assert effective_type("Q3_K", 384) == "Q4_0"
    assert effective_type("IQ2_XXS", 384) == "IQ4_NL"
    assert effective_type("IQ4_XS", 384) == "IQ4_NL"
    assert effective_type("Q4_K", 384) == "Q5_0"
    assert effective_type("Q5_K", 384) == "Q5_1"
    assert effective_type("Q6_K", 384) == "Q8_0"
    assert effective_type("Q8_0", 384) == "Q8_0"
    assert effective_type("Q4_K", 1024) == "Q4_K"
    # rows no 32-block divides: F16
    assert effective_type("Q4_K", 100) == "F16"
    assert effective_type("Q8_0", 100) == "F16"
    # every fallback is a 32-block type that costs at least as much per weight as the type it replaces
    for src, dst in FALLBACK.items():
        assert GGML_TYPES[dst].block == 32
        assert GGML_TYPES[dst].bits_per_weight >= GGML_TYPES[src].bits_per_weight


def test_prices_are_exact():
    assert tensor_bytes("Q4_K", (3, 512)) == 3 * 2 * 144
    assert tensor_bytes("Q8_0", (2, 64)) == 2 * 2 * 34
    assert tensor_bytes("F16", (5, 7)) == 70
    with pytest.raises(BitsearchError, match="cannot be stored as Q4_K"):
        tensor_bytes("Q4_K", (1, 384))


def test_type_menu():
    assert parse_types(None) == SEARCH_TYPES
    assert parse_types("q8_0, Q2_K") == ["Q2_K", "Q8_0"]
    with pytest.raises(BitsearchError, match="unknown ggml type 'Q9_K'"):
        parse_types("Q4_K,Q9_K")


def _plan_dict():
    return {
        "format": "bitsearch-plan",
        "version": 3,
        "unit": "tensor",
        "model": {"model_type": "llama", "sha256": "x", "targets": {"a": [4, 256], "b": [8, 384]}},
        "quantizer": {"scheme": "ggml", "types": ["Q2_K", "Q4_K"]},
        "types": {"a": "Q2_K", "b": "Q4_0"},
        "summary": {},
        "provenance": {},
    }


def test_plan_file_round_trip_and_dispatch(tmp_path):
    plan = TensorPlan.from_dict(_plan_dict())
    plan.fill_summary(0.5)
    assert plan.n_bytes() == 4 * 84 + 8 * 12 * 18
    path = str(tmp_path / "p.json")
    plan.save(path)
    back = load_plan(path)
    assert isinstance(back, TensorPlan) and back.types == plan.types and back.summary["bytes"] == plan.n_bytes()
    with pytest.raises(BitsearchError, match="per-tensor plan of ggml types: export it with --format gguf"):
        BitPlan.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["types"].__setitem__("a", "Q9_K"), "has type 'Q9_K', not a ggml type"),
        (lambda d: d["types"].__setitem__("b", "Q4_K"), "rows of 384 weights, which Q4_K"),
        (lambda d: d["types"].pop("b"), "target 'b' has no type"),
        (lambda d: d["types"].__setitem__("c", "Q8_0"), "tensor 'c' has a type but is not among its targets"),
        (lambda d: d["summary"].__setitem__("bytes", 1), "says 1 bytes but its types cost"),
        (lambda d: d["quantizer"].__setitem__("scheme", "asym"), "unknown quantizer scheme"),
    ],
)
def test_plan_file_errors_are_one_line(tmp_path, edit, message):
    d = _plan_dict()
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BitsearchError, match=message) as err:
        load_plan(str(path))
    assert "\n" not in str(err.value)


def test_presets_figure_is_written(tmp_path):
    from bitsearch.plots import plot_gguf_presets

    rows = [
        {"method": "f32", "at": "F32", "bpw": 32.0, "ppl_llama_cpp": 254.4},
        {"method": "llama.cpp", "at": "Q2_K", "bpw": 3.1, "ppl_llama_cpp": 300.0},
        {"method": "bitsearch", "at": "Q2_K", "bpw": 3.1, "ppl_llama_cpp": 280.0},
        {"method": "bitsearch", "at": "Q4_K_M", "bpw": 4.9, "ppl_llama_cpp": 256.0},
    ]
    out = plot_gguf_presets(rows, str(tmp_path / "f.png"), "t")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tensor_problem_greedy_and_ilp_against_brute_force():
    """One row per tensor, an option per stored type; unavailable and same-price-but-worse types are
    priced out; ilp finds the brute-force optimum, greedy stays in budget with allowed types."""
    from itertools import product

    import numpy as np

    from bitsearch.gguf.search import _problem
    from bitsearch.models import Target
    from bitsearch.search import get_allocator

    rng = np.random.default_rng(0)
    targets = [Target("a", 8, 256), Target("b", 4, 512), Target("c", 6, 384), Target("d", 3, 256)]
    menu = ["IQ2_XS", "Q2_K", "Q3_K", "IQ3_S", "Q4_K", "Q8_0"]
    allowed = {t.name: {effective_type(m, t.in_features) for m in menu} for t in targets}
    columns = sorted(set().union(*allowed.values()), key=lambda n: GGML_TYPES[n].bits_per_weight)
    curves = {}
    for t in targets:
        scale = rng.uniform(0.5, 5)
        curves[t.name] = np.array(
            [
                scale * 2.0 ** -GGML_TYPES[c].bits_per_weight * rng.uniform(0.8, 1.2)
                if c in allowed[t.name]
                else np.nan
                for c in columns
            ]
        )
    problem = _problem(targets, columns, curves)
    options = [[c for c in columns if c in allowed[t.name]] for t in targets]
    cost = {
        (t.name, c): tensor_bytes(c, (t.out_features, t.in_features))
        for t in targets
        for c in columns
        if c in allowed[t.name]
    }
    lo = sum(min(cost[t.name, c] for c in opts) for t, opts in zip(targets, options))
    hi = sum(max(cost[t.name, c] for c in opts) for t, opts in zip(targets, options))
    for budget in np.linspace(lo, hi, 7).astype(int):
        best = min(
            (sum(curves[t.name][columns.index(c)] for t, c in zip(targets, combo)), combo)
            for combo in product(*options)
            if sum(cost[t.name, c] for t, c in zip(targets, combo)) <= budget
        )
        for method in ("greedy", "ilp"):
            choice = get_allocator(method).allocate(problem, int(budget))
            types = [columns[k] for k in choice]
            assert all(c in allowed[t.name] for t, c in zip(targets, types)), method
            assert sum(cost[t.name, c] for t, c in zip(targets, types)) == problem.bytes_of(choice) <= budget
            if method == "ilp":
                assert problem.error_of(choice) == pytest.approx(best[0], rel=1e-9)
