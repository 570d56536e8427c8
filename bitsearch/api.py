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

import json
import os
import time
from dataclasses import replace

import torch
from torch import nn

from .config import (
    DEFAULT_GROUP_SIZE,
    ApplyConfig,
    EvalConfig,
    ExportConfig,
    FinalizeConfig,
    SearchConfig,
    SensitivityConfig,
)
from .errors import BitsearchError
from .inputs import (
    calibration_tokens,
    input_paths,
    invoked_as,
    note,
    parse_bits,
    plan_input,
    provenance_record,
    resolve_model,
    set_threads,
)
from .options import check_choices
from .outputs import check_output, keep_on_interrupt
from .search.build import check_budget_early, search_plan

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
        out,
        "file",
        inputs=input_paths(model, calib, config.data_free_cache),
        overwrite=overwrite,
        what="sensitivity table",
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
    table.meta["command"] = provenance_record()["command"]
    table.meta["model_name"] = loaded.name
    if out and dist.is_main:
        table.save(out)
    dist.barrier()
    return table


def _search_gguf(model, calib, config: SearchConfig, tokenizer, imatrix, out, overwrite):
    """``search`` with ``format="gguf"``: a per-tensor plan of ggml types, saved with its importance
    matrix beside it (``<out stem>.imatrix.gguf``, a llama.cpp imatrix file)."""
    import hashlib

    from .gguf.imatrix import read_imatrix, write_imatrix
    from .gguf.search import search_gguf

    check_output(out, "file", inputs=input_paths(model, calib, imatrix), overwrite=overwrite, what="plan")
    im_path = os.path.splitext(out)[0] + ".imatrix.gguf" if out else None
    check_output(im_path, "file", inputs=input_paths(model, calib, imatrix), overwrite=overwrite, what="imatrix")
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
        provenance_record(), model_name=loaded.name, imatrix_file=os.fspath(imatrix) if imatrix is not None else None
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
        out, "file", inputs=input_paths(model, calib, table, config.data_free_cache), overwrite=overwrite, what="plan"
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
    if config.group_size is None:
        config = replace(config, group_size=table.group_size if table is not None else DEFAULT_GROUP_SIZE)
    elif table is not None and config.group_size != table.group_size:
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
        check_budget_early(
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
    p = plan_input(plan)
    check_output(out, "folder", inputs=input_paths(model, plan), overwrite=overwrite, what="model folder")
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
    from .finalize.recipes import resolve_defaults
    from .io.checkpoint import save_packed
    from .quantize import plan_targets

    config = config or FinalizeConfig()
    check_choices(config)
    config = resolve_defaults(config)
    set_threads(config)
    finalizer = get_finalizer(config.method)
    if config.init not in ["rtn"] + rounders():
        raise BitsearchError(f"init '{config.init}' is not one of rtn, {', '.join(rounders())}")
    check_output(
        out,
        "folder",
        inputs=input_paths(model, plan, calib, config.data_free_cache),
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
    p = plan_input(plan)
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
            f"the same command with --resume to continue",
            checkpoint,
        )
    t0 = time.time()
    info = {"method": config.method, "init": config.init if config.method != "gptq" else None, "training_data": spec}
    info.update(finalizer.finalize(m, p, batch, config, show_progress=config.show_progress, checkpoint=checkpoint))
    info["seconds"] = round(time.time() - t0, 1)
    p.provenance = dict(p.provenance, finalize=dict(info, **provenance_record()))
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
    check_output(out, "file", inputs=input_paths(model, text, reference), overwrite=overwrite, what="results")
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
        note(f"seq_len {seq_len} is more than the model's {limit} positions: evaluating windows of {limit}")
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
    p = plan_input(plan, per_tensor=exporter.plan_unit == "tensor")
    check_output(
        out, exporter.writes, inputs=input_paths(model, plan), overwrite=overwrite, what=f"{config.format} export"
    )
    loaded = resolve_model(model, config, tokenizer)
    from .packed import PackedLinear

    if exporter.plan_unit != "tensor" and not any(isinstance(mod, PackedLinear) for mod in loaded.model.modules()):
        from .quantize import plan_targets

        plan_targets(loaded.model, p, where="plan", check_weights=not force)
    return exporter.export(loaded.model, loaded.tokenizer, p, out)
