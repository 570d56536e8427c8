"""GPTQ (bitsearch.finalize.gptq; CLI studies/reference/gptq.py) on bitsearch's grid: the fast
``fasterquant`` loop (lazy batches, upper Cholesky factor of H^-1, static groups, act order)
gives the same codes as a plain per-column OBS loop with explicit inverse-Hessian updates, and
the whole pipeline the same weights as a plain float64 reference on uniform plans; it leaves
less layer-output error than round-to-nearest on the calibration Gram (per-row widths too) and
beats it on the whole tiny Llama's KL; its results pack to the plan's bytes and back to the
in-place weights bit for bit, under mixed widths with 0 and 16 rows and RTN embeddings.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_gptq.py
"""

import copy

import numpy as np
import pytest
import torch
from plans import MIXED_WIDTHS, mixed_plan

from bitsearch.blocks import BlockRunner
from bitsearch.couplings import find_couplings
from bitsearch.errors import BitsearchError
from bitsearch.finalize.gptq import GPTQResult, GPTQSettings, gptq_layer, gptq_quantize, sequential_groups
from bitsearch.finalize.signround import minmax_qparams
from bitsearch.io.checkpoint import load_packed
from bitsearch.io.loading import load_model
from bitsearch.models import find_targets
from bitsearch.packed import PackedRows
from bitsearch.quant.grid import choose_qparams, fake_quantize
from bitsearch.quantize import fake_quantize_model, pack_model, plan_targets
from bitsearch.search.uniform import uniform_plan
from studies.reference.gptq import main

GS = 16


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------


def correlated_inputs(
    n: int, k: int, seed: int, dead: tuple[int, ...] = (), sample_seed: int | None = None
) -> torch.Tensor:
    """(n, k) inputs with correlated columns of unequal scales (float64); the mixing comes from
    ``seed``, the samples from ``sample_seed`` (default: the same seed)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    scale = torch.rand(k, generator=g, dtype=torch.float64).add(0.2)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    x = (torch.randn(n, k, generator=g, dtype=torch.float64) @ mix) * scale
    x[:, list(dead)] = 0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def row_qparams(w: torch.Tensor, bits: torch.Tensor, gs: int):
    ng = -(-w.shape[1] // gs) if gs != -1 else 1
    s = torch.empty(w.shape[0], ng, dtype=torch.float16)
    z = torch.empty(w.shape[0], ng, dtype=torch.uint8)
    for r in range(w.shape[0]):
        s[r], z[r] = choose_qparams(w[r : r + 1], int(bits[r]), gs)
    return s, z


def bruteforce_gptq(weight, H, bits, gs, percdamp=0.01, act_order=True, static_groups=True):
    """Plain GPTQ: one column at a time in the chosen order, the remaining columns updated at once
    by the OBS step, and the inverse Hessian of the remaining columns updated explicitly
    (Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j]); no lazy batches, no Cholesky."""
    W, H = weight.double().clone(), H.double().clone()
    K = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    qmax = 2.0 ** bits.double() - 1
    if static_groups:
        scales, zeros = row_qparams(W, bits, gs)
    else:
        scales = torch.empty(W.shape[0], -(-K // gs), dtype=torch.float16)
        zeros = torch.empty_like(scales, dtype=torch.uint8)
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K)
    Hinv = torch.linalg.inv(H + percdamp * torch.diag(H).mean() * torch.eye(K, dtype=torch.float64))
    Q = torch.zeros_like(W)
    order = order.tolist()
    for t, j in enumerate(order):
        g = j // gs
        if not static_groups and j % gs == 0:
            scales[:, g], zeros[:, g] = [a[:, 0] for a in row_qparams(W[:, j : j + gs], bits, -1)]
        s, z = scales[:, g].double(), zeros[:, g].double()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        code = torch.minimum((torch.round(W[:, j] / safe) + z).clamp(min=0), qmax)
        Q[:, j] = (code - z) * s
        rest = order[t + 1 :]
        W[:, rest] -= torch.outer((W[:, j] - Q[:, j]) / Hinv[j, j], Hinv[j, rest])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q, scales, zeros


@pytest.mark.parametrize("act_order,static_groups", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("blocksize", [128, 16, 20])
def test_fast_loop_matches_bruteforce(act_order, static_groups, blocksize):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 48, generator=g, dtype=torch.float64) * 0.1
    bits = torch.tensor([2, 3, 4, 2, 3, 8, 2, 5])
    H = hessian(correlated_inputs(200, 48, 2, dead=(5, 30)))
    Qb, sb, zb = bruteforce_gptq(W, H, bits, GS, act_order=act_order, static_groups=static_groups)
    Qf, sf, zf, info = gptq_layer(W, H, bits, GS, act_order=act_order, static_groups=static_groups, blocksize=blocksize)
    assert Qf.dtype == torch.float64 and info["dead"] == 2
    assert torch.equal(sf, sb) and torch.equal(zf, zb)
    assert torch.equal(Qf, Qb)
    assert (Qf[:, [5, 30]] == 0).all()  # dead inputs are zeroed
    # the dequantized values are on the grid: codes = round(w / s) + z exactly, in range
    for r in range(8):
        s = sf[r].double().repeat_interleave(GS)[:48]
        z = zf[r].double().repeat_interleave(GS)[:48]
        codes = Qf[r] / s + z
        assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 2 ** int(bits[r]) - 1
    if act_order:  # the permutation changes the result (otherwise the test would not see it)
        Qn, *_ = gptq_layer(W, H, bits, GS, act_order=False, blocksize=blocksize)
        assert not torch.equal(Qn, Qf)


def test_float32_close_to_float64_and_refusals():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g) * 0.1
    bits = torch.full((16,), 3)
    H = hessian(correlated_inputs(300, 64, 4))
    Q64, *_ = gptq_layer(W.double(), H, bits, GS)
    Q32, s, z, _ = gptq_layer(W, H.float(), bits, GS)
    assert Q32.dtype == torch.float32 and s.dtype == torch.float16 and z.dtype == torch.uint8
    assert (Q32.double() == Q64).float().mean() > 0.97
    with pytest.raises(BitsearchError, match="static groups"):
        gptq_layer(W, H, bits, GS, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="2..8"):
        gptq_layer(W, H, torch.full((16,), 16), GS)
    # a singular Hessian without damping: more damping instead of a failure
    x = correlated_inputs(8, 64, 5)
    Q, *_, info = gptq_layer(W, hessian(x).float(), bits, GS, percdamp=0.0)
    assert torch.isfinite(Q).all() and info["damp"] >= 0


@pytest.mark.parametrize("width", [2, 3])
def test_layer_output_error_below_round_to_nearest(width):
    g = torch.Generator().manual_seed(width)
    W = torch.randn(64, 128, generator=g) * 0.05
    x = correlated_inputs(1024, 128, 10 + width).float()
    held = correlated_inputs(1024, 128, 10 + width, sample_seed=99).float()  # same distribution
    H = hessian(x.double()).float()
    rtn = fake_quantize(W, width, 32)
    bits = torch.full((64,), width)
    for act_order in (True, False):
        Q, *_ = gptq_layer(W, H, bits, 32, act_order=act_order)
        err_g, err_r = (x @ (W - Q).T).pow(2).sum().item(), (x @ (W - rtn).T).pow(2).sum().item()
        held_g, held_r = (held @ (W - Q).T).pow(2).sum().item(), (held @ (W - rtn).T).pow(2).sum().item()
        print(
            f"W{width} act_order={act_order}: ||WX - QX||^2 GPTQ {err_g:.4g} RTN {err_r:.4g}; "
            f"held-out GPTQ {held_g:.4g} RTN {held_r:.4g}"
        )
        assert err_g < 0.75 * err_r and held_g < 0.8 * held_r


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------

WIDTHS = MIXED_WIDTHS


def tokens(model, n: int, seed: int, t: int = 32) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def kl_to(ref, model, x) -> float:
    lp, lq = ref(input_ids=x).logits.log_softmax(-1), model(input_ids=x).logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


@pytest.fixture(scope="module", params=["uniform2", "mixed", "mixed+embedding"])
def quantized(request, llama_dir):
    ref = load_model(llama_dir)
    if request.param == "uniform2":
        plan = uniform_plan(ref, 2, 32)
    elif request.param == "mixed":
        plan = mixed_plan(ref)
    else:
        plan = mixed_plan(ref, r"embed_tokens|layers\.")  # tied embedding: round-to-nearest
    model = load_model(llama_dir)
    res = gptq_quantize(model, plan, tokens(model, 48, 1), GPTQSettings(micro_batch=16), show_progress=False)
    return dict(kind=request.param, ref=ref, plan=plan, model=model, res=res)


def test_whole_model_beats_round_to_nearest(quantized, llama_dir):
    ref, plan, model = quantized["ref"], quantized["plan"], quantized["model"]
    rtn = fake_quantize_model(load_model(llama_dir), plan)
    held = tokens(ref, 16, 7)  # not the calibration tokens
    kl_r, kl_g = kl_to(ref, rtn, held), kl_to(ref, model, held)
    print(f"{quantized['kind']}: held-out KL to float: RTN {kl_r:.4f} GPTQ {kl_g:.4f}")
    # pruned rows (and the RTN embedding with its tied head) leave errors GPTQ cannot reduce
    assert kl_g < (0.9 if quantized["kind"] == "uniform2" else 0.95) * kl_r
    res = quantized["res"]
    assert isinstance(res, GPTQResult) and set(res) == set(plan.bits)
    decoder = [n for n in plan.bits if ".layers." in n]
    assert all(res.info[n]["loss"] > 0 and not res.info[n]["rtn"] for n in decoder)


def test_packs_to_plan_bytes_and_round_trips(quantized):
    plan, model, res = quantized["plan"], quantized["model"], quantized["res"]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in plan.bits}
    for s, z in res.values():
        assert s.dtype == torch.float16 and z.dtype == torch.uint8
    model = pack_model(copy.deepcopy(model), plan, qparams=res)
    total = 0
    for name in plan.bits:
        mod = model.get_submodule(name)
        assert isinstance(mod, PackedRows)
        assert torch.equal(mod.dequantized_weight(), weights[name]), name
        total += mod.packed_bytes()
    assert total == plan.n_bytes()


def test_mixed_widths_rows(quantized, llama_dir):
    if quantized["kind"] == "uniform2":
        pytest.skip("mixed plans only")
    ref, plan, model, res = quantized["ref"], quantized["plan"], quantized["model"], quantized["res"]
    emb = "model.embed_tokens"
    rtn = fake_quantize_model(load_model(llama_dir), plan)
    if quantized["kind"] == "mixed+embedding":
        assert emb in plan.bits and res.info[emb]["rtn"]
        assert torch.equal(model.get_submodule(emb).weight, rtn.get_submodule(emb).weight)
        assert model.lm_head.weight is model.get_submodule(emb).weight  # still tied
        s_rtn, z_rtn = minmax_qparams(ref.get_submodule(emb).weight, plan.bits[emb], plan.group_size)
        assert torch.equal(res[emb][0], s_rtn) and torch.equal(res[emb][1], z_rtn)
    changed = 0
    for name, bits in plan.bits.items():
        b = torch.as_tensor(bits)
        w, w0 = model.get_submodule(name).weight, ref.get_submodule(name).weight
        quant = (b >= 2) & (b <= 8)
        assert (w[b == 0] == 0).all()
        assert torch.equal(w[b == 16], w0[b == 16].half().float())
        s, z = res[name]
        assert (s[~quant] == 1).all() and (z[~quant] == 0).all()
        if name == emb:
            continue
        rq = rtn.get_submodule(name).weight
        changed += int((w[quant] != rq[quant]).sum())
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):  # inputs never dead
            assert res.info[name]["dead"] == 0
            # static groups: the grid of each row is min-max on the float weights, as RTN's
            s_r, z_r = minmax_qparams(w0, bits, plan.group_size)
            assert torch.equal(s[quant], s_r[quant]) and torch.equal(z[quant], z_r[quant])
        if name.endswith("down_proj"):  # pruned gate or up rows: dead inputs, zeroed columns
            mlp = name.rsplit(".", 1)[0]
            pruned = (plan.bits[mlp + ".gate_proj"] == 0) | (plan.bits[mlp + ".up_proj"] == 0)
            assert res.info[name]["dead"] == int(pruned.sum()) > 0
            assert (w[quant][:, torch.as_tensor(pruned)] == 0).all()  # rows at 16 keep theirs
            s_r, z_r = minmax_qparams(w0 * torch.as_tensor(~pruned), bits, plan.group_size)
            assert torch.equal(s[quant], s_r[quant]) and torch.equal(z[quant], z_r[quant])
    assert changed > 0


def test_sequential_groups_and_options(tiny_models):
    for arch, want in (
        ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
        ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ):
        model = load_model(tiny_models[arch])
        runner = BlockRunner(model)
        names = [t.name for t in find_targets(model) if t.name.startswith(runner.prefix + ".0.")]
        h, kw = runner.capture(tokens(model, 2, 0))
        groups = sequential_groups(runner, runner.blocks[0], names, dict(model.named_modules()), h, kw)
        assert [sorted(n.rsplit(".", 1)[1] for n in g) for g in groups] == [sorted(g) for g in want], arch
    path = tiny_models["llama"]
    ref = load_model(path)
    plan = uniform_plan(ref, 3, 32)
    x, held = tokens(ref, 24, 1), tokens(ref, 8, 9)
    outs = {}
    for key, kw in {
        "default": {},
        "one_pass": dict(true_sequential=False),
        "dynamic": dict(act_order=False, static_groups=False),
        "offload": dict(offload=True),
    }.items():
        m = load_model(path)
        offload = kw.pop("offload", False)
        res = gptq_quantize(m, plan, x, GPTQSettings(micro_batch=8, **kw), offload=offload, show_progress=False)
        outs[key] = (m, res)
        if key == "one_pass":
            assert all(len(g) == 1 for g in res.groups)
        else:
            assert all(len(g) == 4 for g in res.groups)
    w = lambda k: outs[k][0].model.layers[1].mlp.down_proj.weight  # noqa: E731
    assert torch.equal(w("default"), w("offload"))
    assert not torch.equal(w("default"), w("one_pass")) and not torch.equal(w("default"), w("dynamic"))
    kl_rtn = kl_to(ref, fake_quantize_model(load_model(path), plan), held)
    for k, (m, _) in outs.items():
        assert kl_to(ref, m, held) < kl_rtn, k
    s, z = outs["dynamic"][1]["model.layers.0.mlp.down_proj"]
    s_mm, _ = minmax_qparams(ref.model.layers[0].mlp.down_proj.weight, plan.bits["model.layers.0.mlp.down_proj"], 32)
    assert not torch.equal(s, s_mm)  # dynamic groups: grids of the error-updated weights


def test_refusals(llama_dir):
    model = load_model(llama_dir)
    plan = mixed_plan(model)
    plan.couplings = find_couplings(model, list(plan.bits))
    assert plan.couplings
    with pytest.raises(BitsearchError, match="coupled pruning"):
        gptq_quantize(model, plan, tokens(model, 4, 0), show_progress=False)
    plan.couplings = []
    with pytest.raises(BitsearchError, match="token ids"):
        gptq_quantize(model, plan, torch.zeros(5, dtype=torch.long), show_progress=False)
    with pytest.raises(BitsearchError, match="static groups"):
        gptq_quantize(model, plan, tokens(model, 4, 0), GPTQSettings(static_groups=False), show_progress=False)
    plan_targets(model, plan)  # the model was not touched by the refusals


def test_cli(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "packed"
    summary = main(
        [
            "--model",
            llama_dir,
            "--calib",
            text_file,
            "--bits",
            "3",
            "--group-size",
            "32",
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--eval-text",
            text_file,
            "--max-tokens",
            "600",
            "--eval-seq-len",
            "64",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert summary["bytes"] == summary["plan_bytes"] and 3 < summary["avg_bits"] < 4
    assert np.isfinite(summary["ppl"]) and summary["eval_tokens"] == 600
    m = load_packed(str(out))
    assert any(isinstance(mod, PackedRows) for mod in m.modules())
    assert "perplexity" in capsys.readouterr().out
    plan_file = tmp_path / "plan.json"
    plan = mixed_plan(load_model(llama_dir))
    plan.save(str(plan_file))
    s2 = main(
        [
            "--model",
            llama_dir,
            "--calib",
            text_file,
            "--plan",
            str(plan_file),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "p2"),
        ]
    )
    assert s2["bytes"] == plan.n_bytes() and "ppl" not in s2


# ---------------------------------------------------------------------------------------------
# against a plain reference pipeline, and the error GPTQ leaves
# ---------------------------------------------------------------------------------------------

LLAMA_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@torch.no_grad()
def reference_gptq_model(model, plan, batch):
    """GPTQ of a float64 model written plainly: block by block on the quantized blocks' outputs,
    the layer groups of a Llama block in order, each group's H = 2 X^T X / n from forward hooks
    after the earlier groups are quantized, and ``bruteforce_gptq`` per layer."""

    def path(n: str) -> str:
        return ("self_attn." if n[0] in "qkvo" else "mlp.") + n

    runner = BlockRunner(model)
    h, kw = runner.capture(batch)
    for i, block in enumerate(runner.blocks):
        for group in LLAMA_GROUPS:
            mods = {n: block.get_submodule(path(n)) for n in group}
            xs = {}
            hooks = [
                m.register_forward_pre_hook((lambda n: lambda _m, a: xs.__setitem__(n, a[0]))(n))
                for n, m in mods.items()
            ]
            runner.run_block(block, h, kw)
            for hk in hooks:
                hk.remove()
            for n, m in mods.items():
                x = xs[n].reshape(-1, xs[n].shape[-1])
                name = f"{runner.prefix}.{i}.{path(n)}"
                bits = torch.as_tensor(plan.bits[name]).long()
                Q, *_ = bruteforce_gptq(m.weight, hessian(x), bits, plan.group_size)
                m.weight.copy_(Q)
        h = runner.run_block(block, h, kw)
    return model


def test_matches_plain_reference_on_uniform_plans(llama_dir):
    """The package's pipeline (InputStats Hessians, structural layer groups, the fast loop) gives
    exactly the plain reference's weights on a float64 model under uniform plans."""
    for width in (2, 3):
        ref = load_model(llama_dir).double()
        plan = uniform_plan(ref, width, GS)
        x = tokens(ref, 12, 3)
        reference_gptq_model(ref, plan, x)
        m = load_model(llama_dir).double()
        res = gptq_quantize(m, plan, x, GPTQSettings(micro_batch=5), show_progress=False)
        assert [[sorted(n.rsplit(".", 1)[1] for n in g) for g in b] for b in res.groups] == [
            [sorted(g) for g in LLAMA_GROUPS]
        ] * len(res.groups)
        for name in plan.bits:
            a, b = m.get_submodule(name).weight, ref.get_submodule(name).weight
            assert a.dtype == torch.float64 and torch.equal(a, b), (width, name)


def test_output_error_below_round_to_nearest_per_row_widths():
    """Rows at mixed widths (0, 2, 3, 4, 8, 16) of one layer: the error GPTQ leaves on the
    calibration Gram, sum over rows of (w - q) H (w - q)^T, is below round-to-nearest's on the rows
    it quantizes; pruned rows are 0 and rows at 16 the float16 weight, as RTN's."""
    from bitsearch.finalize.gptq import _quantize_rows

    g = torch.Generator().manual_seed(5)
    W = torch.randn(48, 96, generator=g) * 0.05
    bits = torch.tensor([0, 2, 3, 4, 8, 16] * 8)
    x = correlated_inputs(2048, 96, 21).float()
    H = hessian(x.double()).float()
    Q, s, z, info = _quantize_rows(
        W, H, bits.numpy(), 32, dict(percdamp=0.01, act_order=True, static_groups=True, blocksize=128)
    )
    R = torch.stack([fake_quantize(W[r : r + 1], int(bits[r]), 32)[0] for r in range(48)])
    quant = (bits >= 2) & (bits <= 8)
    assert torch.equal(Q[~quant], R[~quant])
    for width in (2, 3, 4, 8):
        rows = bits == width
        eg = torch.einsum("rk,kl,rl->", W[rows] - Q[rows], H, W[rows] - Q[rows]).item()
        er = torch.einsum("rk,kl,rl->", W[rows] - R[rows], H, W[rows] - R[rows]).item()
        print(f"W{width}: GPTQ {eg:.4g} RTN {er:.4g}")
        assert eg < er
