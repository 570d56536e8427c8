"""Model-in-the-loop search: a multi-objective Optuna study around the allocator's solution.

The estimators' curves are predictions; this search measures. Each trial moves a compact set of
knobs, builds a plan with the greedy allocator on the adjusted curves, quantizes the model (a
gather from cached fake-quantized weights, ``kl.py``) and measures the real KL to the float model
on calibration tokens. Objectives: minimize (KL, bytes). Knobs:

* ``type:<t>``  log2 multiplier of the curves of every layer of type t (q_proj, down_proj, ...)
* ``block:<g>`` log2 multiplier of the curves of block group g (contiguous blocks, at most 8 groups)
* ``mix:<est>`` weight of each estimator when the table holds several (normalised to sum 1)
* ``bits``      the trial's own budget, in avg bits: one of 5 levels from ``budget - span`` to ``budget``
                (levels rather than a range, so a fair share of trials spend the whole budget)

A trial's multipliers are relative prices between layers, so the greedy still spends its bytes
where the adjusted curves say; every trial is within the budget. Trial 0 is the plain greedy plan
(all multipliers 1, full budget), so the chosen plan — the lowest KL within the budget — is never
worse than greedy on the calibration KL.

Storage: any Optuna storage URL, by default a journal file (``JournalFileBackend``) next to the
plan (in memory when there is no plan file, e.g. an API call without ``out``): a killed run
resumes with its finished trials kept (``--resume``), and several
``bitsearch search --method optuna`` workers pointed at one journal or database cooperate on one
study. Each finished trial stores its plan's widths (one character per channel) as a user
attribute, so ``bitsearch pareto`` lists the front and exports any point without the model.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from ..cost import avg_bits, budget_to_bytes
from ..errors import BitsearchError
from ..io.plan import decode_bits, encode_bits
from ..layer_names import layer_types
from ..outputs import keep_on_interrupt
from ..progress import progress
from .base import Allocator, register_allocator
from .greedy import GreedyAllocator
from .problem import AllocationProblem

__all__ = [
    "SAMPLERS",
    "StudySettings",
    "knob_groups",
    "run_study",
    "open_study",
    "pareto_rows",
    "trial_widths",
    "OptunaAllocator",
    "export_trial",
    "only_study",
    "study_trials",
    "default_storage",
]

SAMPLERS = ("nsga2", "tpe")
LOG2_RANGE = 1.0
#: the trial's own budget takes one of this many levels from budget - span to the budget
BUDGET_LEVELS = 5


@dataclass
class StudySettings:
    storage: str | None  # None: in memory (nothing written, nothing to resume)
    study_name: str
    n_trials: int = 50
    timeout: float | None = None
    sampler: str = "nsga2"
    seed: int = 0
    span: float = 0.25
    resume: bool = False


def knob_groups(layers: list[str], max_groups: int = 8) -> tuple[dict[str, str], dict[str, str]]:
    """(layer -> type knob, layer -> block-group knob) for the problem's layers."""
    parsed = layer_types(layers)
    blocks = sorted({b for b, _t in parsed.values() if b is not None})
    n = len(blocks)
    per = max(1, math.ceil(n / max_groups)) if n else 1
    group_of = {b: f"block:{i // per}" for i, b in enumerate(blocks)}
    types = {n_: f"type:{parsed[n_][1]}" for n_ in layers}
    groups = {n_: group_of.get(parsed[n_][0], "block:other") for n_ in layers}
    return types, groups


def journal_storage(path: str | None):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if path is None:
        return optuna.storages.InMemoryStorage()
    return (
        JournalStorage(JournalFileBackend(path))
        if not path.startswith(("sqlite:", "mysql", "postgresql"))
        else optuna.storages.RDBStorage(path)
    )


def _sampler(name: str, seed: int):
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    raise BitsearchError(f"unknown sampler '{name}' (choose from {', '.join(SAMPLERS)})")


def open_study(settings: StudySettings, create: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(settings.storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not create:
        if settings.study_name not in names:
            raise BitsearchError(
                f"no study '{settings.study_name}' in '{settings.storage}' (it has: {', '.join(names) or 'none'})"
            )
        return optuna.load_study(study_name=settings.study_name, storage=storage)
    if settings.study_name in names and not settings.resume:
        raise BitsearchError(
            f"study '{settings.study_name}' already exists in '{settings.storage}': "
            f"pass `resume` to continue it (or study_name for a new one)"
        )
    return optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        load_if_exists=True,
        directions=["minimize", "minimize"],
        sampler=_sampler(settings.sampler, settings.seed),
    )


def run_study(
    problems: dict[str, AllocationProblem],
    kl_of,
    budget_bytes: int,
    settings: StudySettings,
    show_progress: bool = True,
    attrs: dict | None = None,
):
    """Run (or continue) the study. ``problems``: {estimator: problem} over the same channels and
    menu; ``kl_of(widths)`` measures a plan. Returns the study."""
    import optuna

    first = next(iter(problems.values()))
    layers = list(first.layer_slices)
    types, groups = knob_groups(layers)
    ests = list(problems)
    n_w = first.n_weights
    hi_bits = avg_bits(budget_bytes, n_w)
    lo_bits = max(avg_bits(first.min_bytes(), n_w), hi_bits - settings.span)
    levels = (
        sorted(
            {round(hi_bits - (hi_bits - lo_bits) * k / (BUDGET_LEVELS - 1), 6) for k in range(BUDGET_LEVELS)}
            | {hi_bits},
            reverse=True,
        )
        if hi_bits > lo_bits
        else [hi_bits]
    )
    study = open_study(settings, create=True)
    study.set_user_attr("budget_bytes", budget_bytes)
    study.set_user_attr("n_weights", n_w)
    study.set_user_attr("layers", {n: int(s.stop - s.start) for n, s in first.layer_slices.items()})
    study.set_user_attr("menu", first.bits)
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) and not study.trials:
        base = {k: 0.0 for k in sorted(set(types.values()) | set(groups.values()))}
        base.update({f"mix:{e}": 1.0 for e in ests} if len(ests) > 1 else {})
        base["bits"] = hi_bits
        study.enqueue_trial(base)
    greedy = GreedyAllocator()
    rows = np.concatenate([np.full(s.stop - s.start, i) for i, s in enumerate(first.layer_slices.values())])

    def objective(trial):
        scale = np.ones(len(layers))
        for i, name in enumerate(layers):
            scale[i] = 2.0 ** (
                trial.suggest_float(types[name], -LOG2_RANGE, LOG2_RANGE)
                + trial.suggest_float(groups[name], -LOG2_RANGE, LOG2_RANGE)
            )
        if len(ests) > 1:
            w = np.array([trial.suggest_float(f"mix:{e}", 0.0, 1.0) for e in ests])
            w = w / w.sum() if w.sum() > 0 else np.full(len(ests), 1.0 / len(ests))
            errors = sum(wi * problems[e].errors for wi, e in zip(w, ests))
        else:
            errors = first.errors
        bits = trial.suggest_categorical("bits", levels) if len(levels) > 1 else hi_bits
        trial_budget = min(budget_bytes, budget_to_bytes(f"{bits}", n_w)) if bits < hi_bits else budget_bytes
        p = AllocationProblem(
            bits=first.bits,
            errors=errors * scale[rows][:, None],
            costs=first.costs,
            fixed_bytes=first.fixed_bytes,
            n_weights=n_w,
            layer_slices=first.layer_slices,
            group_size=first.group_size,
        )
        choice = greedy.allocate(p, max(trial_budget, p.min_bytes()))
        widths = first.widths(choice)
        kl = kl_of(widths)
        n_bytes = first.bytes_of(choice)
        trial.set_user_attr("widths", {n: encode_bits(w) for n, w in widths.items()})
        trial.set_user_attr("avg_bits", avg_bits(n_bytes, n_w))
        trial.set_user_attr("predicted_error", first.error_of(choice))
        return kl, float(n_bytes)

    def finished() -> int:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # an interrupted trial: our one line, not its traceback
    # --resume: finish the study to n_trials in all (workers sharing a study stop together);
    # otherwise run n_trials more
    t0 = time.time()
    for _ in progress(range(settings.n_trials), desc="optuna trials", enable=show_progress):
        if settings.timeout is not None and time.time() - t0 > settings.timeout:
            break
        if settings.resume and finished() >= settings.n_trials:
            break
        study.optimize(objective, n_trials=1, catch=())
    return study


def trial_widths(trial) -> dict[str, np.ndarray]:
    return {n: decode_bits(t, f"trial {trial.number}") for n, t in trial.user_attrs["widths"].items()}


def pareto_rows(study, budget_bytes: int | None = None) -> list[dict]:
    """Finished trials as rows (number, kl, bytes, avg_bits, on_front, within_budget, knobs)."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    out = []
    for t in done:
        kl, b = t.values
        out.append(
            {
                "trial": t.number,
                "kl": kl,
                "bytes": int(b),
                "avg_bits": t.user_attrs.get("avg_bits"),
                "on_front": t.number in front,
                "within_budget": budget_bytes is None or b <= budget_bytes,
                **{f"knob.{k}": v for k, v in t.params.items()},
            }
        )
    return sorted(out, key=lambda r: (r["bytes"], r["kl"]))


def default_storage(out: str | None) -> str | None:
    """The journal next to the plan file ``out``; None (in memory) without one."""
    return os.path.splitext(out)[0] + ".optuna.journal" if out else None


@register_allocator
class OptunaAllocator(Allocator):
    """The study's chosen plan (see the module docstring); ``trials`` keeps the study's rows."""

    name = "optuna"
    needs_model = True
    finalists = 5

    def __init__(self, settings: StudySettings | None = None):
        self.settings = settings
        self.last_info: dict = {}
        self.trials: list[dict] = []

    @classmethod
    def from_config(cls, config) -> "OptunaAllocator":
        if config.sampler not in SAMPLERS:
            raise BitsearchError(f"unknown sampler '{config.sampler}' (choose from {', '.join(SAMPLERS)})")
        return cls(
            StudySettings(
                storage=config.storage,
                study_name=config.study_name or "",
                n_trials=config.n_trials,
                timeout=config.timeout,
                sampler=config.sampler,
                seed=config.seed,
                span=config.span,
                resume=config.resume,
            )
        )

    def allocate(self, problem: AllocationProblem, budget_bytes: int) -> np.ndarray:
        """Run the study and return the chosen trial's choice.

        Without a validation batch the chosen plan is the lowest-KL trial within the budget. With
        one (samples the trials never saw), the ``finalists`` lowest-KL trials within the budget and
        trial 0 (the allocator's own plan) are measured on it and the lowest wins: among many trials
        the lowest search KL partly fits the search samples, the held-out KL does not."""
        from .kl import PlanKL

        ctx = self.context
        settings = self.settings or StudySettings(storage=None, study_name="")
        if settings.storage is None and ctx.out:
            settings.storage = default_storage(ctx.out)
        if not settings.study_name:
            settings.study_name = f"bitsearch-{ctx.fingerprint.get('sha256', 'model')[:10]}-{budget_bytes}B"
        problems = ctx.estimator_problems or {"mix": problem}
        if settings.storage is not None:
            keep_on_interrupt(
                f"the study's finished trials are kept in '{settings.storage}': rerun the same command with "
                f"--resume to continue it"
            )
        problem.check_budget(budget_bytes)
        kl = PlanKL(ctx.model, ctx.targets, ctx.batch, problem.bits, problem.group_size, ctx.micro_batch)
        study = run_study(
            problems,
            kl,
            budget_bytes,
            settings,
            ctx.show_progress,
            attrs={"model": ctx.fingerprint, "group_size": problem.group_size},
        )
        rows = pareto_rows(study, budget_bytes)
        inside = [r for r in rows if r["within_budget"]]
        if not inside:
            raise BitsearchError("the study has no finished trial within the budget")
        best = min(inside, key=lambda r: r["kl"])
        validated = {}
        if ctx.validation is not None:
            val = PlanKL(
                ctx.model, ctx.targets, ctx.validation, problem.bits, problem.group_size, ctx.micro_batch, share=kl
            )
            pool = sorted(inside, key=lambda r: r["kl"])[: self.finalists] + [r for r in inside if r["trial"] == 0]
            for r in pool:
                if r["trial"] not in validated:
                    t = next(t for t in study.trials if t.number == r["trial"])
                    validated[r["trial"]] = val(trial_widths(t))
            best = next(r for r in inside if r["trial"] == min(validated, key=validated.get))
        trial = next(t for t in study.trials if t.number == best["trial"])
        widths = trial_widths(trial)
        menu = np.asarray(problem.bits)
        choice = np.concatenate([np.searchsorted(menu, widths[n]) for n in problem.layer_slices])
        self.trials = rows
        self.last_info = {
            "study": settings.study_name,
            "storage": settings.storage,
            "trial": best["trial"],
            "calibration_kl": best["kl"],
            "trials_finished": len(rows),
            "sampler": settings.sampler,
            "seed": settings.seed,
            "kl_samples": int(ctx.batch.shape[0]),
            "kl_evaluations_this_run": kl.calls,
        }
        if validated:
            self.last_info.update(
                validation_kl=validated[best["trial"]],
                validation_samples=int(ctx.validation.shape[0]),
                validated_trials={str(k): v for k, v in validated.items()},
            )
        return choice


def export_trial(study, number: int):
    """The plan of finished trial ``number`` of a study (no model needed)."""
    import optuna

    from ..io.plan import BitPlan

    trial = next((t for t in study.trials if t.number == number), None)
    if trial is None or trial.state != optuna.trial.TrialState.COMPLETE:
        raise BitsearchError(f"study '{study.study_name}' has no finished trial {number}")
    a = study.user_attrs
    plan = BitPlan(model=a["model"], group_size=a["group_size"], menu=list(a["menu"]), bits=trial_widths(trial))
    plan.fill_summary(predicted_error=trial.user_attrs.get("predicted_error"))
    plan.provenance = {
        "allocator": "optuna",
        "study": study.study_name,
        "trial": number,
        "calibration_kl": trial.values[0],
    }
    return plan


def only_study(storage: str, study_name: str | None) -> str:
    """``study_name``, or the name of the one study ``storage`` holds."""
    import optuna

    if not os.path.exists(storage) and "://" not in storage:
        raise BitsearchError(f"study storage '{storage}' does not exist")
    if study_name is not None:
        return study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.get_all_study_summaries(journal_storage(storage))]
    if len(names) != 1:
        raise BitsearchError(f"'{storage}' holds {len(names)} studies ({', '.join(names)}): name the study")
    return names[0]


def study_trials(storage: str, study_name: str | None = None, export: int | None = None):
    """(the trials of a study as rows with its front marked, the plan of trial ``export`` or None)."""
    study = open_study(StudySettings(storage=storage, study_name=only_study(storage, study_name)), create=False)
    rows = pareto_rows(study, study.user_attrs.get("budget_bytes"))
    return rows, (export_trial(study, export) if export is not None else None)
