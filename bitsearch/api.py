"""One entry point per stage; keyword arguments mirror the CLI flags (the CLI does no math).

    sensitivity(model=..., calib=..., out=...)      -> SensitivityTable   (writes Parquet)
    search(model=..., calib=..., budget=..., out=...) -> BitPlan          (writes plan JSON)
    apply(model=..., plan=..., out=...)             -> dict               (writes a checkpoint)
    evaluate(model=..., text=...)                   -> EvalResult         (optionally JSON)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from . import __version__
from .apply import fake_quantize_model, packed_tensor_bytes, plan_targets, save_fake, save_packed
from .atomic import write_text_atomic
from .cost import avg_bits, budget_to_bytes
from .couplings import find_couplings
from .data import calibration_batches, read_text, tokenize_text
from .errors import BitsearchError
from .evaluate import EvalResult, perplexity
from .models import find_targets, load_model, load_tokenizer, model_fingerprint
from .plan import BitPlan
from .search import build_problem, get_allocator
from .sensitivity import DEFAULT_BITS, SensitivityTable, check_bits, compute_sensitivity
from .sensitivity.table import format_mix
from .sensitivity.pipeline import CALIB_REF_BITS

__all__ = ["sensitivity", "search", "search_plan", "apply", "evaluate", "plot_sensitivity", "plot_plan", "plot_pareto", "pareto", "parse_bits"]


def parse_bits(bits: str | list[int] | None) -> list[int]:
    if bits is None:
        return list(DEFAULT_BITS)
    if isinstance(bits, str):
        try:
            bits = [int(b) for b in bits.split(",") if b.strip()]
        except ValueError:
            raise BitsearchError(f"--bits '{bits}' must be comma-separated integers, e.g. 0,2,3,4,5,6,8") from None
    return check_bits(list(bits))


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])


def _check_out(out: str | None, what: str) -> None:
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise BitsearchError(f"cannot write {what} '{out}': '{parent}' is not a folder")


def _calib(tokenizer, calib, samples, seq_len, seed):
    batch, spec = calibration_batches(tokenizer, calib, samples, seq_len, seed)
    return batch, spec.to_dict()


def _load_for_sensitivity(model: str, device: str, dtype: str, offload: bool):
    if not offload:
        return load_model(model, device, dtype), load_tokenizer(model)
    from .sensitivity.streaming import offload_blocks

    return offload_blocks(load_model(model, "cpu", dtype), device), load_tokenizer(model)


def sensitivity(*, model: str, calib: str, out: str | None = None, samples: int = 128, seq_len: int = 512,
                seed: int = 0, estimators: str = "imatrix", bits: str | list[int] | None = None,
                group_size: int = 128, targets: str | None = None, exclude: str | None = None,
                calibrate: str = "auto", calib_loss_samples: int = 16, mix: str | None = None,
                probes: int = 8, offload: bool = False, checkpointing: bool = False, device: str = "cpu",
                dtype: str = "float32", micro_batch: int = 8, show_progress: bool = True,
                _loaded=None) -> SensitivityTable:
    """Per-channel error curves of every target from each of ``estimators`` (comma-separated),
    saved as a Parquet table when ``out`` is set. Under ``torchrun`` the calibration batch is
    shared across processes and rank 0 writes the table."""
    from .distributed import from_env

    _check_out(out, "sensitivity table")
    menu = parse_bits(bits)
    dist, device = from_env(device)
    m, tok = _loaded if _loaded is not None else _load_for_sensitivity(model, device, dtype, offload)
    tgts = find_targets(m, targets, exclude)
    batch, calib_info = _calib(tok, calib, samples, seq_len, seed)
    table = compute_sensitivity(m, tgts, batch, estimators=estimators, bits=menu, group_size=group_size,
                                calibrate=calibrate, calib_samples=calib_loss_samples, micro_batch=micro_batch,
                                probes=probes, seed=seed, mix=mix, offload=offload, checkpointing=checkpointing,
                                dist=dist, calib_info=calib_info, show_progress=show_progress)
    table.meta["command"] = _command_line()
    table.meta["model_name"] = model
    if out and dist.is_main:
        table.save(out)
    dist.barrier()
    return table


def search_plan(table: SensitivityTable, targets, fingerprint: dict, *, budget: str | float,
                method: str = "greedy", bits: str | list[int] | None = None, min_bits: int | None = None,
                max_bits: int | None = None, mix: str | dict | None = None,
                provenance: dict | None = None, choose=None, allocator_options: dict | None = None,
                couplings: list | None = None) -> BitPlan:
    """Allocate widths for ``targets`` from a table's curves (estimator ``mix``, default the
    table's) under a budget; no model needed. ``choose(problem, budget_bytes) -> (choice, info)``
    replaces the registered allocator (model-in-the-loop methods). With ``couplings`` (and 0 in
    the menu) the registered allocator prunes whole units (``search/coupled.py``)."""
    menu = parse_bits(bits) if bits is not None else table.bits
    mix = table.resolve_mix(mix)
    problem = build_problem(table, targets, menu, min_bits, max_bits, mix)
    budget_bytes = budget_to_bytes(budget, problem.n_weights)
    t0 = time.time()
    couplings = list(couplings or []) if 0 in problem.bits else []
    if choose is None:
        allocator = get_allocator(method, **(allocator_options or {}))
        info = {"allocator_options": allocator_options} if allocator_options else {}
        if couplings:
            from .search.coupled import allocate_coupled

            shapes = {t.name: (t.out_features, t.in_features) for t in targets}
            widths, predicted, cinfo = allocate_coupled(problem, allocator, budget_bytes, couplings, shapes)
            info.update(cinfo)
        else:
            choice = allocator.allocate(problem, budget_bytes)
            widths, predicted = problem.widths(choice), problem.error_of(choice)
        if getattr(allocator, "last_info", None):
            info["allocator_info"] = {k: v for k, v in allocator.last_info.items()
                                      if isinstance(v, (int, float, str, type(None)))}
    else:
        choice, info = choose(problem, budget_bytes)
        widths, predicted, couplings = problem.widths(choice), problem.error_of(choice), []
    plan = BitPlan(model=fingerprint, group_size=table.group_size, menu=problem.bits, bits=widths,
                   couplings=[c for c in couplings if c.dead_units(widths).any()])
    plan.fill_summary(predicted_error=predicted)
    if plan.summary["bytes"] > budget_bytes:
        raise AssertionError("allocator went over budget")
    plan.provenance = dict(provenance or {}, allocator=method, budget=str(budget), budget_bytes=budget_bytes,
                           budget_avg_bits=avg_bits(budget_bytes, problem.n_weights),
                           estimator_mix=format_mix(mix), table_calibration=table.meta.get("calibration"),
                           calibration=table.meta.get("calibration_data"), min_bits=min_bits, max_bits=max_bits,
                           search_seconds=round(time.time() - t0, 3), package_version=__version__,
                           time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info)
    return plan


def _parse_layer_min_bits(items: list[str] | None) -> dict[str, int] | None:
    """["down_proj=3", ...] -> {"down_proj": 3}."""
    if not items:
        return None
    out = {}
    for item in items:
        pattern, sep, width = item.rpartition("=")
        if not sep or not pattern:
            raise BitsearchError(f"--layer-min-bits '{item}' must look like REGEX=WIDTH, e.g. down_proj=3")
        try:
            out[pattern] = int(width)
        except ValueError:
            raise BitsearchError(f"--layer-min-bits '{item}': width '{width}' is not an integer") from None
    return out


#: search methods that run the model (the others need only a sensitivity table)
MODEL_METHODS = ("optuna", "diffq")


def search(*, model: str, budget: str, out: str | None = None, calib: str | None = None,
           sensitivity_table: str | None = None, method: str = "greedy", bits: str | None = None,
           group_size: int = 128, min_bits: int | None = 2, max_bits: int | None = None,
           samples: int = 128, seq_len: int = 512, seed: int = 0, estimators: str = "imatrix",
           targets: str | None = None, exclude: str | None = None, calibrate: str = "auto",
           calib_loss_samples: int = 16, mix: str | None = None, probes: int = 8,
           checkpointing: bool = False, device: str = "cpu", dtype: str = "float32",
           micro_batch: int = 8, n_trials: int = 50, timeout: float | None = None, sampler: str = "nsga2",
           storage: str | None = None, study_name: str | None = None, resume: bool = False,
           span: float = 0.25, kl_samples: int = 8, steps: int = 100, lr: float = 0.05,
           granularity: str = "channel", share: list[str] | None = None, layer_min_bits: list[str] | None = None,
           time_limit: float | None = None, coupling: bool = True, show_progress: bool = True,
           _loaded=None) -> BitPlan:
    """A bit plan under ``budget`` ("2.5" avg bits or "12MB"/"12MiB"), saved as JSON when ``out`` is set.

    ``method``: an allocator on the table's curves (greedy, ilp with ``granularity``/``share``/
    ``layer_min_bits``/``time_limit``, snr, uniform) or a model-in-the-loop search that needs
    ``calib`` (optuna: ``n_trials``, ``timeout``, ``sampler``, ``storage``, ``study_name``,
    ``resume``, ``span``, ``kl_samples``; diffq: ``steps``, ``lr``, ``kl_samples``).
    ``min_bits`` defaults to 2: pruning (width 0) is off unless asked for with ``min_bits=0``,
    because the calibrated imatrix estimate still under-predicts what pruning costs (README).
    With pruning on, ``coupling`` (default) prunes whole MLP channels and key-value head groups,
    freeing the consumer's columns too (``couplings.py``); only table-driven allocators do so.
    """
    _check_out(out, "plan")
    options = None
    if method == "ilp":
        options = {"granularity": granularity, "share": share or None,
                   "min_bits": _parse_layer_min_bits(layer_min_bits), "time_limit": time_limit}
    elif granularity != "channel" or share or layer_min_bits:
        raise BitsearchError("--granularity, --share and --layer-min-bits need --method ilp")
    if method not in MODEL_METHODS:
        get_allocator(method, **(options or {}))  # fail fast on a typo or a bad option
    elif calib is None:
        raise BitsearchError(f"--method {method} measures plans on calibration text: give --calib FILE")
    if sensitivity_table is not None:
        table = SensitivityTable.load(sensitivity_table)
        if group_size != table.group_size:
            raise BitsearchError(f"--group-size {group_size} differs from the sensitivity table's "
                                 f"{table.group_size}: recompute the table or pass --group-size {table.group_size}")
    elif calib is None:
        raise BitsearchError("search needs --calib FILE (or a precomputed --sensitivity table)")
    m, tok = _loaded if _loaded is not None else (load_model(model, device, dtype), None)
    if sensitivity_table is None:
        tok = tok or load_tokenizer(model)
        # curves only for widths this search may pick (plus the calibration width): with the
        # default --min-bits 2 that skips the pruning response, a second forward pass per layer
        lo = -1 if min_bits is None else min_bits
        hi = 99 if max_bits is None else max_bits
        menu = sorted({b for b in parse_bits(bits) if lo <= b <= hi} | {CALIB_REF_BITS})
        table = sensitivity(model=model, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                            estimators=estimators, bits=menu, group_size=group_size, targets=targets,
                            exclude=exclude, calibrate=calibrate, calib_loss_samples=calib_loss_samples,
                            mix=mix, probes=probes, checkpointing=checkpointing, micro_batch=micro_batch,
                            show_progress=show_progress, _loaded=(m, tok))
    tgts = find_targets(m, targets, exclude)
    fp = model_fingerprint(m, tgts)
    if table.meta.get("model", {}).get("config_sha256") not in (None, fp["config_sha256"]):
        raise BitsearchError(f"sensitivity table '{sensitivity_table}' was computed for another model")
    if method == "optuna":
        from .search.optuna_study import StudySettings, default_storage, optuna_plan

        tok = tok or load_tokenizer(model)
        batch, _ = _calib(tok, calib, kl_samples, seq_len, seed)
        settings = StudySettings(storage=storage or default_storage(out), n_trials=n_trials, timeout=timeout,
                                 study_name=study_name or f"bitsearch-{fp['sha256'][:10]}-{budget}",
                                 sampler=sampler, seed=seed, span=span, resume=resume)
        plan, rows = optuna_plan(m, table, tgts, fp, batch, budget=budget, settings=settings,
                                 bits=parse_bits(bits) if bits is not None else None, min_bits=min_bits,
                                 max_bits=max_bits, mix=mix, micro_batch=micro_batch, show_progress=show_progress)
        plan.provenance.update(command=_command_line(), model_name=model, budget=str(budget),
                               package_version=__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if out:
            import pandas as pd

            write_text_atomic(os.path.splitext(out)[0] + ".trials.csv", pd.DataFrame(rows).to_csv(index=False))
    else:
        choose = None
        if method == "diffq":
            from .search.diffq import DiffqSettings, diffq_allocate

            tok = tok or load_tokenizer(model)
            batch, _ = _calib(tok, calib, kl_samples, seq_len, seed)
            settings = DiffqSettings(steps=steps, lr=lr, seed=seed)

            def choose(problem, budget_bytes):
                return diffq_allocate(m, tgts, batch, problem, budget_bytes, settings, micro_batch, show_progress)
        plan = search_plan(table, tgts, fp, budget=budget, method=method, bits=bits, min_bits=min_bits,
                           max_bits=max_bits, mix=mix, provenance={"command": _command_line(), "model_name": model},
                           choose=choose, allocator_options=options,
                           couplings=find_couplings(m, [t.name for t in tgts]) if coupling else None)
    if out:
        plan.save(out)
    return plan


def apply(*, model: str, plan: str | BitPlan, out: str, fake: bool = False, device: str = "cpu",
          dtype: str = "float32", _loaded=None) -> dict:
    """Write the planned model to ``out``: a packed checkpoint, or with ``fake`` a plain HF one.

    With ``fake`` the (loaded) model's target weights are replaced in place by their quantized values.
    """
    p = BitPlan.load(plan) if isinstance(plan, str) else plan
    m, tok = _loaded if _loaded is not None else (load_model(model, device, dtype), load_tokenizer(model))
    plan_targets(m, p, where=f"plan '{plan}'" if isinstance(plan, str) else "plan")
    if fake:
        fake_quantize_model(m, p)
        save_fake(m, out, tok)
        return {"out": out, "fake": True, "plan_bytes": p.n_bytes()}
    written = save_packed(m, p, out, tok)
    return {"out": out, "fake": False, "plan_bytes": p.n_bytes(), "written_bytes": written,
            "file_bytes": packed_tensor_bytes(out), "avg_bits": p.summary.get("avg_bits")}


def evaluate(*, model: str, text: str, max_tokens: int | None = None, seq_len: int = 512,
             json_out: str | None = None, reference: str | None = None, device: str = "cpu",
             dtype: str = "float32", micro_batch: int = 4, show_progress: bool = True,
             _loaded=None, _reference_loaded=None) -> EvalResult:
    """Perplexity (and KL to ``reference``) of a model or packed checkpoint on a text file."""
    if seq_len < 2:
        raise BitsearchError(f"--seq-len must be at least 2 (got {seq_len})")
    if max_tokens is not None and max_tokens < 2:
        raise BitsearchError(f"--max-tokens must be at least 2 (got {max_tokens})")
    _check_out(json_out, "results")
    m, tok = _loaded if _loaded is not None else (load_model(model, device, dtype), load_tokenizer(model))
    ids = tokenize_text(tok, read_text(text))
    ref = _reference_loaded
    if reference is not None and ref is None:
        ref = load_model(reference, device, dtype)
    with torch.inference_mode():
        result = perplexity(m, ids, seq_len, max_tokens, micro_batch, reference=ref, name=model,
                            reference_name=reference, show_progress=show_progress)
    if json_out:
        write_text_atomic(json_out, json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def plot_sensitivity(*, table: str, out: str, estimator: str | None = None, width: int | None = None) -> str:
    """A PNG summary of a sensitivity table (heatmap, spread per layer type, SNR against bits)."""
    from .plot_sensitivity import plot_sensitivity as _plot

    _check_out(out, "plot")
    return _plot(SensitivityTable.load(table), out, estimator=estimator, width=width)


def plot_plan(*, plan: str, out: str, title: str | None = None) -> str:
    """A PNG of a bit plan: width of every channel per layer, width mix per layer type, bits per block."""
    from .plot_plan import plot_plan as _plot

    _check_out(out, "plot")
    return _plot(BitPlan.load(plan), out, title=title)


def pareto(*, storage: str, study_name: str | None = None, export: int | None = None, out: str | None = None,
           csv: str | None = None) -> tuple[list[dict], BitPlan | None]:
    """The trials of an optuna search study (front marked); with ``export`` that trial's plan
    (saved to ``out``). ``study_name`` may be omitted when the storage holds one study."""
    import optuna

    from .search.optuna_study import StudySettings, export_trial, open_study, pareto_rows

    if not os.path.exists(storage) and "://" not in storage:
        raise BitsearchError(f"study storage '{storage}' does not exist")
    if study_name is None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from .search.optuna_study import journal_storage

        names = [s.study_name for s in optuna.get_all_study_summaries(journal_storage(storage))]
        if len(names) != 1:
            raise BitsearchError(f"'{storage}' holds {len(names)} studies ({', '.join(names)}): pass --study-name")
        study_name = names[0]
    study = open_study(StudySettings(storage=storage, study_name=study_name), create=False)
    rows = pareto_rows(study, study.user_attrs.get("budget_bytes"))
    if csv:
        import pandas as pd

        write_text_atomic(csv, pd.DataFrame(rows).to_csv(index=False))
    plan = None
    if export is not None:
        if out is None:
            raise BitsearchError("--export needs --out PLAN.json")
        _check_out(out, "plan")
        plan = export_trial(study, export)
        plan.save(out)
    return rows, plan


def plot_pareto(*, storage: str, out: str, study_name: str | None = None, model: str | None = None,
                calib: str | None = None, kl_samples: int = 8, seq_len: int = 512, seed: int = 0,
                device: str = "cpu", dtype: str = "float32") -> str:
    """A PNG of a study's trials and front; with ``model`` and ``calib`` also uniform RTN points,
    their KL measured on ``kl_samples`` calibration samples like the study's trials."""
    from .cost import avg_bits, plan_bytes
    from .models import target_of
    from .plot_pareto import plot_pareto as _plot
    from .quant.grid import QUANT_WIDTHS
    from .search.kl import PlanKL
    from .search.optuna_study import StudySettings, open_study

    _check_out(out, "plot")
    rows, _ = pareto(storage=storage, study_name=study_name)
    if study_name is None:
        import optuna

        from .search.optuna_study import journal_storage

        study_name = optuna.get_all_study_summaries(journal_storage(storage))[0].study_name
    attrs = open_study(StudySettings(storage=storage, study_name=study_name), create=False).user_attrs
    n_w = attrs["n_weights"]
    uniform = []
    if model is not None:
        if calib is None:
            raise BitsearchError("uniform points need --calib as well as --model")
        m, tok = load_model(model, device, dtype), load_tokenizer(model)
        modules = dict(m.named_modules())
        if any(n not in modules for n in attrs["layers"]) or \
                model_fingerprint(m, [target_of(n, modules[n]) for n in attrs["layers"]])["sha256"] != attrs["model"]["sha256"]:
            raise BitsearchError(f"the study was run on another model than '{model}'")
        targets = [target_of(n, modules[n]) for n in attrs["layers"]]
        widths = [b for b in attrs["menu"] if b in QUANT_WIDTHS]
        batch, _ = _calib(tok, calib, kl_samples, seq_len, seed)
        kl = PlanKL(m, targets, batch, widths, attrs["group_size"])
        shapes = {t.name: (t.out_features, t.in_features) for t in targets}
        for w in widths:
            bits = {t.name: np.full(t.out_features, w) for t in targets}
            uniform.append({"label": f"W{w}", "avg_bits": avg_bits(plan_bytes(shapes, bits, attrs["group_size"]), n_w),
                            "kl": kl(bits)})
    return _plot(rows, out, budget_bits=avg_bits(attrs["budget_bytes"], n_w), uniform=uniform,
                 title=f"study {study_name}")
