"""studies/finalizer_repair.py: the per-row output error from input Grams equals the error summed
over the tokens directly, and a checkpoint that is round-to-nearest itself repairs nothing."""

import numpy as np
import torch

from bitsearch.io.checkpoint import load_packed, save_packed
from bitsearch.io.loading import load_model, load_tokenizer
from bitsearch.models import find_targets
from bitsearch.quantize import fake_quantize_model, pack_model
from bitsearch.search.uniform import uniform_plan
from studies import finalizer_repair


def test_row_errors_equal_the_error_summed_over_tokens():
    g = torch.Generator().manual_seed(0)
    delta, x = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(40, 7, generator=g, dtype=torch.float64)
    direct = ((x @ delta.T) ** 2).sum(dim=0)  # row r: sum over tokens t of (delta_r . x_t)^2
    assert torch.allclose(finalizer_repair.row_errors(delta, x.T @ x), direct, rtol=1e-10)


def test_round_to_nearest_checkpoint_repairs_nothing(llama_dir, tmp_path):
    m = load_model(llama_dir, "cpu", "float32")
    plan = uniform_plan(m, 2, 32)
    names = [t.name for t in find_targets(m)]
    plan.bits[names[0]][:3] = 3  # two widths in one layer
    plan.fill_summary()
    batch = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    grams = finalizer_repair.input_grams(m, names, batch)
    seen = []
    h = m.get_submodule(names[-1]).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        m(batch)  # both samples at once
    h.remove()
    x = seen[0].double()
    assert torch.allclose(grams[names[-1]], x.T @ x, rtol=1e-6, atol=1e-6)
    packed = load_model(llama_dir, "cpu", "float32")
    pack_model(packed, plan)
    save_packed(packed, plan, str(tmp_path / "p"), load_tokenizer(llama_dir))
    rtn = fake_quantize_model(load_model(llama_dir, "cpu", "float32"), plan)
    rows = finalizer_repair.repair_table(plan, m, rtn, {"same": load_packed(str(tmp_path / "p"))}, grams)
    assert sum(r["rows"] for r in rows) == sum(len(b) for b in plan.bits.values())
    assert {(r["layer type"], r["width"]) for r in rows} >= {(names[0].rsplit(".", 1)[-1], 3)}
    assert all(r["rtn error"] > 0 for r in rows)
    assert np.allclose([r["same / rtn"] for r in rows], 1.0, rtol=1e-4)
