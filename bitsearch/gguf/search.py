"""Per-tensor search over ggml types: llama.cpp's round-trip errors, in loss units, priced at exact bytes.

Targets are every weight matrix llama.cpp quantizes (the decoder's linears, the token embeddings
and an untied output). For tensor t and ggml type T (after llama.cpp's fallback for rows T's block
does not divide) the raw error is that of llama.cpp's own quantize -> dequantize round trip with
the importance weights llama.cpp would use (``imatrix_j`` = mean of x_j^2 over the calibration
tokens, as ``llama-imatrix`` collects it):

    linear:     e_t(T) = sum_rows sum_j imatrix_j (w - q_T(w))^2
    embeddings: e_t(T) = sum_c p_c ||w_c - q_T(w)_c||^2 (+ the output term when the head is tied)

with p_c the token frequencies. As for the per-channel imatrix curves, each tensor's curve is then
rescaled to the calibration loss by its measured loss response to being stored alone in a
reference type (``calibrate.py``), so one Lagrange multiplier compares tensors. The allocators
(greedy, ilp) solve the same multiple-choice knapsack with one row per tensor and one option per
type; a type a tensor cannot take (another type with the same price and a larger error, or one
its rows fall back from) is priced out.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..cost import avg_bits, budget_to_bytes, parse_budget
from ..errors import BitsearchError
from ..models import Target, find_targets, model_fingerprint
from ..progress import progress
from ..search import AllocationProblem, get_allocator
from ..sensitivity.base import LayerCurves
from ..sensitivity.calibrate import calibrate_layer_loss, loss_response
from ..sensitivity.stats import InputStats
from .arch import gguf_arch, gguf_name
from .imatrix import Imatrix
from .plan import TensorPlan
from .quantize import round_trip
from .types import GGML_TYPES, effective_type, ggml_type, parse_types, tensor_bytes

__all__ = [
    "gguf_targets",
    "collect_imatrix",
    "imatrix_for",
    "token_frequencies",
    "tensor_curves",
    "GGUFProblem",
    "build_gguf_problem",
    "allocate_gguf",
    "search_gguf",
    "DEFAULT_REF_TYPE",
    "GGUF_METHODS",
]

#: type whose measured loss response scales each tensor's curve (as 2 bits does per channel)
DEFAULT_REF_TYPE = "Q2_K"
GGUF_METHODS = ("greedy", "ilp")


def gguf_targets(model: nn.Module) -> list[Target]:
    """Every weight matrix llama.cpp stores quantized (a tied output goes with the embeddings)."""
    gguf_arch(model.config)
    targets = find_targets(model, targets=r".")
    for t in targets:
        gguf_name(t.name)
    return targets


def _embedding_heads(targets: list[Target]) -> dict[str, str]:
    return {h: t.name for t in targets if t.kind == "embedding" for h in t.tied}


@torch.no_grad()
def collect_imatrix(
    model: nn.Module,
    targets: list[Target],
    batch: torch.Tensor,
    micro_batch: int = 8,
    dataset: str = "",
    show_progress: bool = True,
) -> Imatrix:
    """llama.cpp's importance matrix of the targets over ``batch`` (keyed by GGUF tensor name); a
    tied output's inputs count for ``token_embd.weight``, whose lookups ``llama-imatrix`` never sees."""
    heads = _embedding_heads(targets)
    mods = {t.name: model.get_submodule(t.name) for t in targets if t.kind == "linear"}
    mods.update({h: model.get_submodule(h) for h in heads})
    device = next(model.parameters()).device
    with InputStats(mods, "diag") as stats:
        for j in progress(range(0, batch.shape[0], micro_batch), desc="imatrix", enable=show_progress):
            model(batch[j : j + micro_batch].to(device))
            stats.end_pass()
    entries = {}
    for name in mods:
        owner = heads.get(name, name)
        entries[gguf_name(owner)] = (
            stats.total(name).float().cpu().numpy(),
            int(stats.counts[stats.alias.get(name, name)]),
        )
    seq = batch.shape[1]
    return Imatrix(entries, [dataset] if dataset else [], chunk_count=batch.shape[0], chunk_size=seq)


def imatrix_for(imat: Imatrix | None, target: Target) -> np.ndarray | None:
    """The importance weights llama.cpp quantizes ``target`` with (None when the file has none)."""
    if imat is None:
        return None
    name = gguf_name(target.name)
    if name not in imat.entries:
        return None
    w = imat.mean(name)
    if w.shape != (target.in_features,):
        raise BitsearchError(
            f"the imatrix entry '{name}' has {w.size} values for a tensor with rows of "
            f"{target.in_features} weights (imatrix of another model?)"
        )
    return w


def token_frequencies(batch: torch.Tensor, vocab: int) -> np.ndarray:
    ids = batch.reshape(-1)
    return (torch.bincount(ids, minlength=vocab).double() / max(ids.numel(), 1)).numpy()


def _raw_error(t: Target, w: np.ndarray, q: np.ndarray, weights: np.ndarray | None, freq: np.ndarray) -> float:
    d2 = (w.astype(np.float64) - q) ** 2
    if t.kind == "embedding":
        err = float(freq @ d2.sum(1))
        return err + (float(d2.sum(0) @ weights) if (t.tied and weights is not None) else 0.0)
    return float(d2.sum(0) @ (weights if weights is not None else np.ones(w.shape[1])))


def _columns(targets: list[Target], menu: list[str], imat: Imatrix | None) -> tuple[list[str], dict[str, set[str]]]:
    """The problem's options (every type some tensor is stored in, by price) and the types each
    tensor can be stored in: the menu after llama.cpp's fallbacks for its row length, less the
    types ggml makes only with importance weights where the tensor has none (an untied
    ``token_embd``: ``llama-imatrix`` never sees its lookups)."""
    allowed = {}
    for t in targets:
        weighted = imatrix_for(imat, t) is not None
        allowed[t.name] = {
            e for e in (effective_type(m, t.in_features) for m in menu) if weighted or not GGML_TYPES[e].needs_imatrix
        }
        if not allowed[t.name]:
            raise BitsearchError(
                f"no type of the menu ({','.join(menu)}) can store '{gguf_name(t.name)}' without "
                f"an importance matrix entry"
            )
    stored = sorted(set().union(*allowed.values()), key=lambda n: GGML_TYPES[n].bits_per_weight)
    return stored, allowed


def tensor_curves(
    model: nn.Module,
    targets: list[Target],
    columns: list[str],
    allowed: dict[str, set[str]],
    imat: Imatrix | None,
    freq: np.ndarray,
    threads: int = 1,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Raw round-trip error of every target in every allowed type (NaN where not allowed)."""
    jobs = [(t, c) for t in targets for c in columns if c in allowed[t.name]]
    weights = {t.name: model.get_submodule(t.name).weight.detach().float().cpu().numpy() for t in targets}
    imw = {t.name: imatrix_for(imat, t) for t in targets}

    def one(job):
        t, c = job
        q = round_trip(weights[t.name], c, imw[t.name])
        return _raw_error(t, weights[t.name], q, imw[t.name], freq)

    out = {t.name: np.full(len(columns), np.nan) for t in targets}
    with ThreadPoolExecutor(max(1, threads)) as pool:  # ggml releases the GIL
        for (t, c), e in zip(
            jobs, progress(pool.map(one, jobs), total=len(jobs), desc="ggml round trips", enable=show_progress)
        ):
            out[t.name][columns.index(c)] = e
    return out


def _problem(targets: list[Target], columns: list[str], errors: dict[str, np.ndarray]) -> AllocationProblem:
    """One row per tensor; unavailable options (and same-price options with a larger error) priced out."""
    n = len(targets)
    err = np.stack([errors[t.name] for t in targets])
    cost = np.array(
        [
            [
                tensor_bytes(c, (t.out_features, t.in_features)) if np.isfinite(errors[t.name][k]) else 0
                for k, c in enumerate(columns)
            ]
            for t in targets
        ],
        dtype=np.int64,
    )
    avail = np.isfinite(err)
    ok = avail.copy()
    earlier = np.arange(len(columns))[None, :] < np.arange(len(columns))[:, None]  # [k, j]: j < k
    for i in range(n):
        for k in np.flatnonzero(avail[i]):
            rivals = avail[i] & (cost[i] == cost[i, k])
            if (rivals & ((err[i] < err[i, k]) | ((err[i] == err[i, k]) & earlier[k]))).any():
                ok[i, k] = False
    big_cost = int(cost.sum()) + 1
    big_err = (float(np.nanmax(np.abs(err))) + 1.0) * 1e6
    cost = np.where(ok, cost, big_cost)
    err = np.where(ok, err, big_err)
    return AllocationProblem(
        bits=list(range(len(columns))),
        errors=err,
        costs=cost,
        fixed_bytes=0,
        n_weights=sum(t.numel for t in targets),
        layer_slices={t.name: slice(i, i + 1) for i, t in enumerate(targets)},
        group_size=0,
    )


@dataclass
class GGUFProblem:
    """The allocation problem of one model: a row per tensor, an option per stored type."""

    problem: AllocationProblem
    columns: list[str]
    targets: list[Target]
    fingerprint: dict
    imatrix: Imatrix
    menu: list[str]
    ref_type: str


def build_gguf_problem(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    types: str | list[str] | None = None,
    ref_type: str = DEFAULT_REF_TYPE,
    calib_samples: int = 16,
    micro_batch: int = 8,
    imatrix: Imatrix | None = None,
    threads: int | None = None,
    dataset: str = "",
    show_progress: bool = True,
) -> GGUFProblem:
    """Loss-calibrated round-trip errors and exact prices of every target in every type of the
    menu (``imatrix``: a llama.cpp one instead of collecting it on ``batch``)."""
    menu = parse_types(types)
    ref = ggml_type(ref_type).name
    targets = gguf_targets(model)
    if imatrix is None:
        imatrix = collect_imatrix(model, targets, batch, micro_batch, dataset, show_progress)
    columns, allowed = _columns(targets, menu, imatrix)
    emb = [t for t in targets if t.kind == "embedding"]
    freq = token_frequencies(batch, emb[0].out_features) if emb else np.zeros(0)
    raw = tensor_curves(
        model, targets, columns, allowed, imatrix, freq, threads or torch.get_num_threads(), show_progress
    )
    # loss response of each tensor alone in the reference type (its fallback where it has one)
    ref_of = {t.name: effective_type(ref, t.in_features) for t in targets}
    imw = {t.name: imatrix_for(imatrix, t) for t in targets}

    def perturb(name, w):
        return torch.from_numpy(round_trip(w.cpu().numpy(), ref_of[name], imw[name])).to(w.device)

    responses = loss_response(
        model, targets, batch[:calib_samples], perturb, f"response @{ref}", micro_batch, show_progress
    )
    n = len(columns)
    with_ref = {}
    for t in targets:  # each raw curve plus its reference-type error as a last column
        k = columns.index(ref_of[t.name]) if ref_of[t.name] in columns else None
        if k is not None and np.isfinite(raw[t.name][k]):
            ref_raw = raw[t.name][k]
        else:
            w = model.get_submodule(t.name).weight.detach().float().cpu().numpy()
            ref_raw = _raw_error(t, w, round_trip(w, ref_of[t.name], imw[t.name]), imw[t.name], freq)
        with_ref[t.name] = LayerCurves(
            errors=np.append(np.nan_to_num(raw[t.name], nan=0.0), ref_raw)[None, :], metrics={}
        )
    scaled = calibrate_layer_loss(with_ref, responses, list(range(n + 1)), n)
    curves = {name: np.where(np.isfinite(raw[name]), lc.errors[0, :n], np.nan) for name, lc in scaled.items()}
    return GGUFProblem(
        _problem(targets, columns, curves), columns, targets, model_fingerprint(model, targets), imatrix, menu, ref
    )


def allocate_gguf(gp: GGUFProblem, budget: str | float, method: str = "greedy") -> TensorPlan:
    """The plan of ``gp`` within ``budget`` (average bits over the targets, or bytes)."""
    if method not in GGUF_METHODS:
        raise BitsearchError(f"--format gguf searches with {' or '.join(GGUF_METHODS)}, not '{method}'")
    problem = gp.problem
    budget_bytes = budget_to_bytes(budget, problem.n_weights)
    if budget_bytes < problem.min_bytes():
        raise BitsearchError(
            f"budget {budget_bytes} bytes ({avg_bits(budget_bytes, problem.n_weights):.4f} bits) "
            f"is below the smallest plan of types {','.join(gp.menu)}: {problem.min_bytes()} bytes "
            f"({avg_bits(problem.min_bytes(), problem.n_weights):.4f} bits)"
        )
    choice = get_allocator(method).allocate(problem, budget_bytes)
    types = {t.name: gp.columns[int(choice[i])] for i, t in enumerate(gp.targets)}
    plan = TensorPlan(model=gp.fingerprint, types=types, menu=gp.menu)
    plan.fill_summary(problem.error_of(choice))
    plan.provenance = {
        "estimator": "ggml-imatrix",
        "allocator": method,
        "budget": budget,
        "reference_type": gp.ref_type,
        "package_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return plan


def search_gguf(
    model: nn.Module,
    batch: torch.Tensor,
    budget: str | float,
    *,
    types: str | list[str] | None = None,
    method: str = "greedy",
    ref_type: str = DEFAULT_REF_TYPE,
    calib_samples: int = 16,
    micro_batch: int = 8,
    imatrix: Imatrix | None = None,
    threads: int | None = None,
    calib_info: dict | None = None,
    show_progress: bool = True,
) -> tuple[TensorPlan, Imatrix]:
    """A per-tensor plan of ggml types within ``budget`` and the importance matrix it was scored with."""
    t0 = time.time()
    if method not in GGUF_METHODS:
        raise BitsearchError(f"--format gguf searches with {' or '.join(GGUF_METHODS)}, not '{method}'")
    parse_budget(budget)
    gp = build_gguf_problem(
        model,
        batch,
        types=types,
        ref_type=ref_type,
        calib_samples=calib_samples,
        micro_batch=micro_batch,
        imatrix=imatrix,
        threads=threads,
        dataset=(calib_info or {}).get("source", ""),
        show_progress=show_progress,
    )
    plan = allocate_gguf(gp, budget, method)
    plan.provenance.update(
        calibration=calib_info or {}, calib_loss_samples=calib_samples, seconds=round(time.time() - t0, 2)
    )
    return plan, gp.imatrix
