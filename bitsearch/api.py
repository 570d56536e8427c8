"""The Python API: one function per stage, each taking a model (an ``nn.Module`` or a path / hub
id), its inputs and one config object (``bitsearch.config``); each returns an object and writes a
file only when ``out`` is given.

    table = sensitivity(model, calib, SensitivityConfig())              -> SensitivityTable
    plan  = search(model, calib, SearchConfig(budget="2.5"))            -> BitPlan
    model = apply(model, plan, ApplyConfig(), out=None)                 -> nn.Module (packed, in place)
    model = finalize(model, plan, calib, FinalizeConfig())              -> nn.Module (packed, in place)
    res   = evaluate(model, text, EvalConfig(), reference=None)         -> EvalResult
    info  = export(model, plan, out, ExportConfig(format="packed"))     -> dict

Calibration data (``calib``) is a text file (or ``hf:NAME[:CONFIG]:SPLIT``), a list of texts, or a
LongTensor of token ids (N, L); with ``config.data_free = N`` the float model generates it. A model
given as an ``nn.Module`` is used as it is (``apply`` and ``finalize`` change it in place, as
torchao's ``quantize_`` does); its tokenizer is ``tokenizer=`` or loaded from its
``name_or_path``, and only when text has to be tokenized.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import __version__
from .config import (
    ApplyConfig,
    CalibConfig,
    EvalConfig,
    ExportConfig,
    FinalizeConfig,
    RunConfig,
    SearchConfig,
    SensitivityConfig,
)
from .errors import BitsearchError
from .options import check_choices
from .outputs import check_output, keep_on_interrupt

__all__ = [
    "sensitivity",
    "search",
    "search_plan",
    "apply",
    "finalize",
    "evaluate",
    "export",
    "parse_bits",
    "invoked_as",
    "resolve_model",
    "calibration_tokens",
]

_INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitsearch_invoked_as", default=None)


def _note(message: str) -> None:
    print(f"bitsearch: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def invoked_as(command_line: str):
    """Record ``command_line`` (the CLI's) in the provenance of what is made inside the block."""
    token = _INVOKED_AS.set(command_line)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def _provenance() -> dict:
    return {
        "command": _INVOKED_AS.get() or "python API",
        "package_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_bits(bits: str | list[int] | None) -> list[int]:
    from .sensitivity import DEFAULT_BITS, check_bits

    if bits is None:
        return list(DEFAULT_BITS)
    if isinstance(bits, str):
        try:
            bits = [int(b) for b in bits.split(",") if b.strip()]
        except ValueError:
            raise BitsearchError(f"bit menu '{bits}' must be comma-separated integers, e.g. 0,2,3,4,5,6,8") from None
    return check_bits(list(bits))


# ---- models and data ------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model, the tokenizer it came with (if any) and a name for provenance."""

    model: nn.Module
    tokenizer: object | None
    name: str

    def tok(self):
        """The tokenizer, loaded from the model's folder or hub id when not given."""
        if self.tokenizer is None:
            from .io.loading import load_tokenizer

            path = getattr(self.model, "name_or_path", "") or getattr(
                getattr(self.model, "config", None), "_name_or_path", ""
            )
            if not path:
                raise BitsearchError(
                    "text needs a tokenizer: pass tokenizer= (the model has no name_or_path to load one from)"
                )
            self.tokenizer = load_tokenizer(path)
        return self.tokenizer


def set_threads(config: RunConfig) -> None:
    if config.threads is not None:
        if config.threads < 1:
            raise BitsearchError(f"threads must be at least 1 (got {config.threads})")
        torch.set_num_threads(config.threads)


def resolve_model(model, config: RunConfig, tokenizer=None, offload: bool = False) -> Loaded:
    """``model`` as a :class:`Loaded`: an ``nn.Module`` as it is, a path or hub id loaded on
    ``config.device`` in ``config.dtype`` (with ``offload``: blocks kept on the CPU)."""
    from .io.loading import load_model, load_tokenizer
    from .models import check_finite

    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        check_finite(model)
        name = getattr(model, "name_or_path", "") or type(model).__name__
        return Loaded(model, tokenizer, str(name))
    if not isinstance(model, (str, os.PathLike)):
        raise BitsearchError(f"model must be an nn.Module or a model folder / hub id, not {type(model).__name__}")
    path = os.fspath(model)
    if path.endswith(".gguf") and os.path.isfile(path):  # dequantized through the gguf package
        from .gguf.load import load_gguf
        from .io.loading import resolve_device, resolve_dtype

        m, tok = load_gguf(path, resolve_dtype(config.dtype))
        return Loaded(m.to(resolve_device(config.device)), tokenizer or tok, path)
    if offload:
        from .blocks import offload_blocks

        m = offload_blocks(load_model(path, "cpu", config.dtype), config.device)
    else:
        m = load_model(path, config.device, config.dtype)
    check_finite(m)
    return Loaded(m, tokenizer or load_tokenizer(path), path)


def calibration_tokens(
    loaded: Loaded,
    calib,
    config: CalibConfig,
    n: int | None = None,
    *,
    out: str | None = None,
    what: str = "this stage",
) -> tuple[torch.Tensor, dict]:
    """(n, seq_len) token windows and a record of where they came from: from ``calib`` (a file,
    a list of texts, or token ids, whose first ``n`` rows are used) or, with ``config.data_free``,
    generated by the model (cached at ``config.data_free_cache`` or next to ``out``). Windows
    longer than the model's positions are refused."""
    from .data import calibration_batches
    from .models import max_positions

    n = config.samples if n is None else n
    limit = max_positions(loaded.model)

    def fits(length: int) -> None:
        if limit is not None and length > limit:
            raise BitsearchError(f"seq_len {length} exceeds the model's {limit} positions")

    if (calib is None) == (config.data_free is None):
        raise BitsearchError(
            f"{what} needs calibration data: give `calib` FILE or `data_free` N (not both; "
            f"`calib` may also be a list of texts or token ids)"
        )
    if config.data_free is not None:
        from .datafree import default_cache_path, load_or_generate

        fits(config.seq_len)
        if config.data_free < 1:
            raise BitsearchError(f"data_free {config.data_free}: the number of samples must be at least 1")
        cache = config.data_free_cache or (default_cache_path(out, loaded.model, config.seed) if out else None)
        return load_or_generate(
            loaded.model,
            loaded.tok(),
            n,
            config.seq_len,
            cache,
            seed=config.seed,
            overwrite=config.overwrite_data_free,
            show_progress=config.show_progress,
            log=lambda m: print(m, file=sys.stderr),
        )
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64) or calib.shape[1] < 2:
            raise BitsearchError(
                f"calibration token ids must be an integer tensor (samples, tokens), not "
                f"{calib.dtype} {tuple(calib.shape)}"
            )
        fits(calib.shape[1])
        if calib.shape[0] < n:
            raise BitsearchError(f"{what} needs {n} calibration samples; the token tensor has {calib.shape[0]}")
        return calib[:n].long(), {"source": "token ids", "samples": n, "seq_len": int(calib.shape[1])}
    if isinstance(calib, (list, tuple)):
        if not calib or not all(isinstance(t, str) for t in calib):
            raise BitsearchError("calibration texts must be a non-empty list of strings")
        source = list(calib)
    elif isinstance(calib, (str, os.PathLike)):
        source = os.fspath(calib)
    else:
        raise BitsearchError(
            f"calibration data must be a file, a list of texts or token ids, not {type(calib).__name__}"
        )
    batch, spec = calibration_batches(loaded.tok(), source, n, config.seq_len, config.seed, config.allow_overlap)
    fits(config.seq_len)
    return batch, spec.to_dict()


def _plan(plan, per_tensor: bool = False):
    """A plan object from a plan or its file; a per-tensor (GGUF) plan only where ``per_tensor``."""
    from .gguf.plan import TensorPlan
    from .io.plan import BitPlan, load_plan

    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(os.fspath(plan)) if per_tensor else BitPlan.load(os.fspath(plan))
    if isinstance(plan, BitPlan) or (per_tensor and isinstance(plan, TensorPlan)):
        return plan
    raise BitsearchError(f"plan must be a BitPlan or a plan file, not {type(plan).__name__}")


def _inputs(*items) -> tuple:
    """The paths among a stage's inputs (models, plans, texts, tables) that its output must spare."""
    return tuple(os.fspath(i) for i in items if isinstance(i, (str, os.PathLike)))


# ---- stages ---------------------------------------------------------------------------------------


def sensitivity(
    model,
    calib=None,
    config: SensitivityConfig | None = None,
    *,
    tokenizer=None,
    out: str | None = None,
    overwrite: bool = False,
    imatrix: str | None = None,
):
    """Per-channel error curves of every target from each of ``config.estimators``, as a
    :class:`~bitsearch.sensitivity.SensitivityTable` (saved as Parquet at ``out``). Under
    ``torchrun`` the calibration batch is shared across processes and rank 0 writes the table.
    ``imatrix``: a llama.cpp imatrix file (GGUF or legacy .dat) used as the importance matrix
    instead of collecting the imatrix estimator's statistics."""
    from .distributed import from_env
    from .models import find_targets
    from .sensitivity import compute_sensitivity

    config = config or SensitivityConfig()
    check_choices(config)
    set_threads(config)
    if config.data_free is not None and config.offload:
        raise BitsearchError(
            "data-free samples are generated with the whole model on the device: they cannot be "
            "combined with offload (generate the cache once without offload, then reuse it)"
        )
    check_output(
        out, "file", inputs=_inputs(model, calib, config.data_free_cache), overwrite=overwrite, what="sensitivity table"
    )
    menu = parse_bits(config.bits)
    dist, device = from_env(config.device)
    loaded = resolve_model(model, replace(config, device=device), tokenizer, offload=config.offload)
    m = loaded.model
    tgts = find_targets(m, config.targets, config.exclude)
    if config.data_free is not None and dist.world > 1:  # rank 0 generates, the others read its cache
        if not (config.data_free_cache or out):
            raise BitsearchError("data-free samples under torchrun need out or data_free_cache (a shared cache file)")
        if dist.is_main:
            calibration_tokens(
                loaded,
                calib,
                replace(config, show_progress=config.show_progress and dist.is_main),
                out=out,
                what="sensitivity",
            )
        dist.barrier()
    batch, calib_info = calibration_tokens(
        loaded, calib, replace(config, show_progress=config.show_progress and dist.is_main), out=out, what="sensitivity"
    )
    given = None
    if imatrix is not None:
        from .gguf.imatrix import read_imatrix
        from .gguf.search import imatrix_for

        imat = read_imatrix(os.fspath(imatrix))
        given = {}
        for t in tgts:
            w = imatrix_for(imat, t) if t.kind == "linear" else None
            if w is None:
                raise BitsearchError(f"imatrix file '{os.fspath(imatrix)}' has no entry for target '{t.name}'")
            given[t.name] = torch.from_numpy(w)
        calib_info = dict(calib_info, imatrix=os.fspath(imatrix))
    table = compute_sensitivity(
        m,
        tgts,
        batch,
        estimators=config.estimators,
        bits=menu,
        group_size=config.group_size,
        calibrate=config.loss_calibration,
        calib_samples=config.loss_calibration_samples,
        micro_batch=config.micro_batch,
        probes=config.probes,
        seed=config.seed,
        mix=config.mix,
        offload=config.offload,
        checkpointing=config.checkpointing,
        dist=dist,
        calib_info=calib_info,
        show_progress=config.show_progress,
        imatrix=given,
    )
    table.meta["command"] = _provenance()["command"]
    table.meta["model_name"] = loaded.name
    if out and dist.is_main:
        table.save(out)
    dist.barrier()
    return table


def _check_budget_early(targets, budget: str, lowest: int, group_size: int, format: str | None = None) -> None:
    """A budget that does not parse, or that every row at the ``lowest`` width allowed already
    exceeds (in ``format``'s bytes if given), refused before minutes of sensitivity pass (the
    allocators check it again, exactly)."""
    from .cost import budget_to_bytes, check_budget_fits, plan_bytes

    n_weights = sum(t.numel for t in targets)
    if format is not None:
        from .export import get_exporter

        exp = get_exporter(format)
        need = sum(exp.module_bytes(t.out_features, t.in_features, max(lowest, 2), group_size) for t in targets)
    else:
        need = plan_bytes(
            {t.name: (t.out_features, t.in_features) for t in targets},
            {t.name: [lowest] * t.out_features for t in targets},
            group_size,
        )
    check_budget_fits(budget_to_bytes(budget, n_weights), need, n_weights, lowest)


def search_plan(
    table,
    targets,
    fingerprint: dict,
    config: SearchConfig,
    *,
    allocator=None,
    couplings=None,
    context=None,
    provenance: dict | None = None,
):
    """The plan of ``config.method`` (or of ``allocator``) from a table's curves, under
    ``config.budget``: the one place where plans and their provenance are built. A
    model-in-the-loop allocator measures candidates through ``context``; with ``couplings`` (and 0
    in the menu) whole units are pruned (``search/coupled.py``) whatever the allocator. With
    ``config.format`` (an exporter whose unit is the module) widths are priced and budgeted in that
    format's bytes (``search/formats.py``), one width per module."""
    from .cost import avg_bits, budget_to_bytes
    from .io.plan import BitPlan
    from .search import allocator_from_config, build_problem
    from .sensitivity.table import format_mix

    if config.budget is None:
        raise BitsearchError("search needs a budget: avg bits (e.g. 2.5) or bytes (12MB, 12MiB)")
    allocator = allocator or allocator_from_config(config)
    menu = parse_bits(config.bits) if config.bits is not None else table.bits
    mix = table.resolve_mix(config.mix)
    problem = build_problem(table, targets, menu, config.min_bits, config.max_bits, mix)
    if config.format is not None:
        from .search.formats import format_problem

        if allocator.name != "ilp" or config.granularity != "layer":
            raise BitsearchError("a plan for a format takes one width per module: method ilp, granularity layer")
        problem = format_problem(problem, {t.name: (t.out_features, t.in_features) for t in targets}, config.format)
    budget_bytes = budget_to_bytes(config.budget, problem.n_weights)
    if budget_bytes > problem.max_useful_bytes():
        _note(
            f"budget {config.budget} is more than the widest plan needs "
            f"({avg_bits(problem.max_useful_bytes(), problem.n_weights):.4f} bits): every channel gets the "
            f"widest width allowed"
        )
    couplings = list(couplings or []) if 0 in problem.bits and config.format is None else []
    if allocator.needs_model:
        if context is None:
            raise BitsearchError(
                f"search method '{allocator.name}' measures plans on the model: it needs calibration data"
            )
        allocator.context = context
    t0 = time.time()
    info = {}
    if couplings:
        from .search.coupled import allocate_coupled

        shapes = {t.name: (t.out_features, t.in_features) for t in targets}
        widths, predicted, info = allocate_coupled(problem, allocator, budget_bytes, couplings, shapes)
    else:
        choice = allocator.allocate(problem, budget_bytes)
        widths, predicted = problem.widths(choice), problem.error_of(choice)
    last = getattr(allocator, "last_info", None) or {}
    if allocator.needs_model:
        info.update(last)
    elif last:
        info["allocator_info"] = {k: v for k, v in last.items() if isinstance(v, (int, float, str, type(None)))}
    plan = BitPlan(
        model=fingerprint,
        group_size=table.group_size,
        menu=problem.bits,
        bits=widths,
        couplings=[c for c in couplings if c.dead_units(widths).any()],
    )
    plan.fill_summary(predicted_error=predicted)
    if config.format is not None:
        from .search.formats import format_bytes

        n_bytes = format_bytes(plan, config.format)
        plan.summary["format"] = {
            "name": config.format,
            "bytes": n_bytes,
            "avg_bits": avg_bits(n_bytes, problem.n_weights),
        }
    if plan.summary.get("format", plan.summary)["bytes"] > budget_bytes:
        raise AssertionError("allocator went over budget")
    plan.provenance = dict(
        provenance or {},
        **_provenance(),
        allocator=allocator.name,
        budget=str(config.budget),
        budget_bytes=budget_bytes,
        budget_avg_bits=avg_bits(budget_bytes, problem.n_weights),
        estimator_mix=format_mix(mix),
        table_calibration=table.meta.get("calibration"),
        calibration=table.meta.get("calibration_data"),
        min_bits=config.min_bits,
        max_bits=config.max_bits,
        search_seconds=round(time.time() - t0, 3),
        **info,
    )
    return plan


def _search_gguf(model, calib, config: SearchConfig, tokenizer, imatrix, out, overwrite):
    """``search`` with ``format="gguf"``: a per-tensor plan of ggml types, saved with its importance
    matrix beside it (``<out stem>.imatrix.gguf``, a llama.cpp imatrix file)."""
    import hashlib

    from .gguf.imatrix import read_imatrix, write_imatrix
    from .gguf.search import search_gguf

    check_output(out, "file", inputs=_inputs(model, calib, imatrix), overwrite=overwrite, what="plan")
    im_path = os.path.splitext(out)[0] + ".imatrix.gguf" if out else None
    check_output(im_path, "file", inputs=_inputs(model, calib, imatrix), overwrite=overwrite, what="imatrix")
    loaded = resolve_model(model, config, tokenizer)
    batch, calib_info = calibration_tokens(loaded, calib, config, out=out, what="search")
    plan, imat = search_gguf(
        loaded.model,
        batch,
        config.budget,
        types=config.types,
        method=config.method,
        ref_type=config.ref_type,
        calib_samples=config.loss_calibration_samples,
        micro_batch=config.micro_batch,
        imatrix=read_imatrix(os.fspath(imatrix)) if imatrix is not None else None,
        calib_info=calib_info,
        show_progress=config.show_progress,
    )
    plan.provenance.update(
        _provenance(), model_name=loaded.name, imatrix_file=os.fspath(imatrix) if imatrix is not None else None
    )
    if out:
        write_imatrix(imat, im_path)
        with open(im_path, "rb") as f:
            plan.imatrix, plan.imatrix_sha256 = os.path.basename(im_path), hashlib.sha256(f.read()).hexdigest()
        plan.save(out)
    return plan


def search(
    model,
    calib=None,
    config: SearchConfig | None = None,
    *,
    tokenizer=None,
    table=None,
    out: str | None = None,
    overwrite: bool = False,
    imatrix: str | None = None,
):
    """A :class:`~bitsearch.io.plan.BitPlan` under ``config.budget`` (avg bits such as 2.5, or bytes
    such as "12MB"), saved as JSON at ``out``.

    The curves come from ``table`` (a SensitivityTable or its Parquet file) or are computed from
    ``calib``; ``config.method`` is any registered allocator (``bitsearch.search.ALLOCATORS``);
    the model-in-the-loop ones (optuna, diffq) measure candidates on ``2 × kl_samples`` calibration
    samples (half to search, half held out to choose). ``min_bits`` defaults to 2: pruning (width
    0) is off unless asked for with ``min_bits=0``. With pruning on, ``coupling`` (default) prunes
    whole MLP channels and key-value head groups, freeing the consumer's columns too.

    ``format="gguf"``: a per-tensor :class:`~bitsearch.gguf.plan.TensorPlan` of ggml types for
    llama.cpp instead (``types``, ``ref_type``; ``imatrix``: a llama.cpp imatrix file to score with)."""
    from .cost import parse_budget
    from .couplings import find_couplings
    from .models import find_targets, model_fingerprint
    from .search import AllocationContext, allocator_from_config, build_problem
    from .sensitivity import SensitivityTable
    from .sensitivity.pipeline import CALIB_REF_BITS

    config = config or SearchConfig()
    check_choices(config)
    set_threads(config)
    if config.budget is None:
        raise BitsearchError("search needs a budget: avg bits (e.g. 2.5) or bytes (12MB, 12MiB)")
    parse_budget(config.budget)  # a budget that does not parse: before any loading
    if config.format == "gguf":
        if table is not None:
            raise BitsearchError("format gguf scores ggml types itself: it takes no sensitivity `table`")
        return _search_gguf(model, calib, config, tokenizer, imatrix, out, overwrite)
    if imatrix is not None or config.types is not None:
        raise BitsearchError("`imatrix` and `types` are options of format gguf")
    check_output(
        out, "file", inputs=_inputs(model, calib, table, config.data_free_cache), overwrite=overwrite, what="plan"
    )
    if config.format is not None:
        from .search.formats import module_search_options

        if config.method not in ("greedy", "ilp") or config.granularity != "channel":
            raise BitsearchError(
                "a plan for a format takes one width per module with the ilp method: method and "
                "granularity cannot change that"
            )
        config = replace(config, method="ilp", **module_search_options(config.fused, config.share))
    allocator = allocator_from_config(config)  # fail fast on a typo or a bad option
    if config.method != "ilp" and (config.granularity != "channel" or config.share or config.layer_min_bits):
        raise BitsearchError("granularity, share and layer_min_bits are options of the ilp method")
    if config.method != "diffq" and (config.learn != "channel" or config.relax != "rtn"):
        raise BitsearchError("learn and relax are options of the diffq method")
    if allocator.needs_model and calib is None and config.data_free is None:
        raise BitsearchError(
            f"search method '{config.method}' measures plans on calibration data: give a text "
            f"file, texts or token ids, or data-free samples"
        )
    if table is None and calib is None and config.data_free is None:
        raise BitsearchError(
            "search needs `calib` (a text file, texts or token ids) or `data_free` (N generated "
            "samples), or a precomputed sensitivity `table`"
        )
    if isinstance(table, (str, os.PathLike)):
        where = os.fspath(table)
        table = SensitivityTable.load(where)
    else:
        where = "given"
    if table is not None and config.group_size != table.group_size:
        raise BitsearchError(
            f"group_size {config.group_size} differs from the sensitivity table's "
            f"{table.group_size}: recompute the table or pass group_size {table.group_size}"
        )
    loaded = resolve_model(model, config, tokenizer, offload=config.offload and not allocator.needs_model)
    m = loaded.model
    tgts = find_targets(m, config.targets, config.exclude)
    if table is None:
        # curves only for widths this search may pick (plus the calibration width): with the
        # default min_bits 2 that skips the pruning response, a second forward pass per layer
        lo = -1 if config.min_bits is None else config.min_bits
        hi = 99 if config.max_bits is None else config.max_bits
        allowed = [b for b in parse_bits(config.bits) if lo <= b <= hi]
        if not allowed:
            raise BitsearchError(f"no width of the menu lies in [min_bits {lo}, max_bits {hi}]")
        _check_budget_early(
            tgts, config.budget, min(allowed), config.group_size, config.format
        )  # before the sensitivity pass
        menu = ",".join(map(str, sorted(set(allowed) | {CALIB_REF_BITS})))
        table = sensitivity(loaded, calib, replace(config, bits=menu), out=None)
    fp = model_fingerprint(m, tgts)
    if table.meta.get("model", {}).get("config_sha256") not in (None, fp["config_sha256"]):
        raise BitsearchError(f"sensitivity table '{where}' was computed for another model")
    couplings = find_couplings(m, [t.name for t in tgts]) if config.coupling else None
    context = None
    if allocator.needs_model:
        k = config.kl_samples
        both, _ = calibration_tokens(loaded, calib, config, 2 * k, out=out, what=f"search method '{config.method}'")
        estimator_problems = None
        if config.mix is None and len(table.estimators) > 1 and not (couplings and 0 in parse_bits(config.bits)):
            menu = parse_bits(config.bits) if config.bits is not None else None
            estimator_problems = {
                e: build_problem(table, tgts, menu, config.min_bits, config.max_bits, {e: 1.0})
                for e in table.estimators
            }
        context = AllocationContext(
            model=m,
            targets=tgts,
            batch=both[:k],
            validation=both[k:],
            table=table,
            fingerprint=fp,
            out=out,
            estimator_problems=estimator_problems,
            micro_batch=config.micro_batch,
            show_progress=config.show_progress,
        )
    plan = search_plan(
        table,
        tgts,
        fp,
        config,
        allocator=allocator,
        couplings=couplings,
        context=context,
        provenance={"model_name": loaded.name},
    )
    if out:
        trials = getattr(allocator, "trials", None)
        if trials:
            import pandas as pd

            from .atomic import write_text_atomic

            write_text_atomic(os.path.splitext(out)[0] + ".trials.csv", pd.DataFrame(trials).to_csv(index=False))
        plan.save(out)
    return plan


def apply(
    model,
    plan,
    config: ApplyConfig | None = None,
    *,
    tokenizer=None,
    out: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> nn.Module:
    """The model quantized by ``plan``, in place: its targets become packed modules (or, with
    ``config.fake``, keep nn.Linear with dequantized weights). ``out``: write the packed checkpoint
    (or, with ``fake``, a plain HF checkpoint). The plan is kept as ``model.bitsearch_plan``."""
    from .io.checkpoint import save_fake, save_packed
    from .quantize import fake_quantize_model, pack_model, plan_targets

    config = config or ApplyConfig()
    check_choices(config)
    set_threads(config)
    p = _plan(plan)
    check_output(out, "folder", inputs=_inputs(model, plan), overwrite=overwrite, what="model folder")
    loaded = resolve_model(model, config, tokenizer)
    m = loaded.model
    plan_targets(
        m, p, where=f"plan '{plan}'" if isinstance(plan, (str, os.PathLike)) else "plan", check_weights=not force
    )
    if config.fake:
        fake_quantize_model(m, p)
        if out:
            save_fake(m, out, loaded.tokenizer)
    else:
        pack_model(m, p)
        if out:
            save_packed(m, p, out, loaded.tokenizer)
    m.bitsearch_plan = p
    return m


def finalize(
    model,
    plan,
    calib=None,
    config: FinalizeConfig | None = None,
    *,
    tokenizer=None,
    out: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> nn.Module:
    """Finalize a plan with ``config.method`` (a registered finalizer: QAT, SignRound, ...) on
    calibration data or data-free samples; the model is packed in place (exactly the plan's bytes)
    and returned, its plan (with the finalizer's record in ``provenance["finalize"]``) kept as
    ``model.bitsearch_plan``. ``out``: write the packed checkpoint; QAT then also keeps a resumable
    checkpoint ``OUT.qat-checkpoint.pt`` every ``checkpoint_every`` seconds (removed once ``out``
    is written)."""
    from .finalize import get_finalizer, rounders
    from .io.checkpoint import save_packed
    from .quantize import plan_targets

    config = config or FinalizeConfig()
    check_choices(config)
    set_threads(config)
    finalizer = get_finalizer(config.method)
    if config.init not in ["rtn"] + rounders():
        raise BitsearchError(f"init '{config.init}' is not one of rtn, {', '.join(rounders())}")
    check_output(
        out,
        "folder",
        inputs=_inputs(model, plan, calib, config.data_free_cache),
        overwrite=overwrite,
        what="packed model folder",
    )
    checkpoint = out.rstrip("/") + ".qat-checkpoint.pt" if out else None
    finalizer.check(config, checkpoint)
    if checkpoint and os.path.exists(checkpoint) and not (config.resume or overwrite):
        raise BitsearchError(
            f"a checkpoint of an earlier run is at '{checkpoint}': pass `resume` to continue it "
            f"or `overwrite` to start again"
        )
    p = _plan(plan)
    if p.couplings:
        raise BitsearchError(
            "finalizing a plan with coupled pruning is not supported yet: apply it with "
            "round-to-nearest (bitsearch apply)"
        )
    loaded = resolve_model(model, config, tokenizer)
    m = loaded.model
    plan_targets(
        m, p, where=f"plan '{plan}'" if isinstance(plan, (str, os.PathLike)) else "plan", check_weights=not force
    )
    batch, spec = calibration_tokens(loaded, calib, config, out=out, what="finalize")
    if checkpoint and config.method == "qat":
        keep_on_interrupt(
            f"QAT progress is kept in '{checkpoint}' (written every {config.checkpoint_every:g} s): rerun "
            f"the same command with --resume to continue"
        )
    t0 = time.time()
    info = {"method": config.method, "init": config.init if config.method != "gptq" else None, "training_data": spec}
    info.update(finalizer.finalize(m, p, batch, config, show_progress=config.show_progress, checkpoint=checkpoint))
    info["seconds"] = round(time.time() - t0, 1)
    p.provenance = dict(p.provenance, finalize=dict(info, **_provenance()))
    if out:
        save_packed(m, p, out, loaded.tokenizer)
        if checkpoint and os.path.exists(checkpoint):
            os.remove(checkpoint)
    m.bitsearch_plan = p
    return m


def evaluate(
    model,
    text,
    config: EvalConfig | None = None,
    *,
    tokenizer=None,
    reference=None,
    out: str | None = None,
    overwrite: bool = False,
):
    """Perplexity (and, with ``reference``, KL to it) of a model or packed checkpoint on ``text``
    (a text file, a list of texts, or a 1-D tensor of token ids); ``out``: also write the result
    as JSON."""
    from .atomic import write_text_atomic
    from .data import read_text, tokenize_text
    from .evaluate import perplexity
    from .models import max_positions

    config = config or EvalConfig()
    check_choices(config)
    set_threads(config)
    if config.seq_len < 2:
        raise BitsearchError(f"seq_len must be at least 2 (got {config.seq_len})")
    if config.max_tokens is not None and config.max_tokens < 2:
        raise BitsearchError(f"max_tokens must be at least 2 (got {config.max_tokens})")
    check_output(out, "file", inputs=_inputs(model, text, reference), overwrite=overwrite, what="results")
    loaded = resolve_model(model, config, tokenizer)
    if isinstance(text, torch.Tensor):
        ids = text.reshape(-1).long()
    elif isinstance(text, (list, tuple)):
        ids = tokenize_text(loaded.tok(), "\n\n".join(text))
    else:
        ids = tokenize_text(loaded.tok(), read_text(os.fspath(text)))
    seq_len = config.seq_len
    limit = max_positions(loaded.model)
    if limit is not None and seq_len > limit:
        _note(f"seq_len {seq_len} is more than the model's {limit} positions: evaluating windows of {limit}")
        seq_len = limit
    ref = ref_name = None
    if reference is not None:
        ref = resolve_model(reference, config).model
        ref_name = reference if isinstance(reference, (str, os.PathLike)) else type(reference).__name__
    with torch.inference_mode():
        result = perplexity(
            loaded.model,
            ids,
            seq_len,
            config.max_tokens,
            config.micro_batch,
            reference=ref,
            name=loaded.name,
            reference_name=ref_name and str(ref_name),
            show_progress=config.show_progress,
        )
    if out:
        write_text_atomic(out, json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def export(
    model,
    plan,
    out: str,
    config: ExportConfig | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Write ``model`` quantized by ``plan`` in the files of a runtime (``config.format``: a
    registered exporter, ``bitsearch.export.EXPORTERS``); returns what was written. ``model`` may
    be a packed checkpoint (``apply`` or ``finalize`` output): exporters that store quantized
    weights keep its codes, scales and zero points."""
    from .export import EXPORTERS, get_exporter

    config = config or ExportConfig()
    check_choices(config)
    set_threads(config)
    exporter = get_exporter(
        config.format, **{k: getattr(config, k) for k in getattr(EXPORTERS.get(config.format), "config_options", ())}
    )
    p = _plan(plan, per_tensor=exporter.plan_unit == "tensor")
    check_output(out, exporter.writes, inputs=_inputs(model, plan), overwrite=overwrite, what=f"{config.format} export")
    loaded = resolve_model(model, config, tokenizer)
    from .packed import PackedLinear

    if exporter.plan_unit != "tensor" and not any(isinstance(mod, PackedLinear) for mod in loaded.model.modules()):
        from .quantize import plan_targets

        plan_targets(loaded.model, p, where="plan", check_weights=not force)
    return exporter.export(loaded.model, loaded.tokenizer, p, out)
