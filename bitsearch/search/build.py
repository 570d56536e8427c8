"""Plans are built in one place: the chosen allocator (any registered one, model-in-the-loop ones
through their ``AllocationContext``) on a sensitivity table's curves, under the budget, with coupled
pruning and a runtime format's prices where asked, and the plan's provenance."""

from __future__ import annotations

import time

from ..config import SearchConfig
from ..errors import BitsearchError
from ..inputs import note, parse_bits, provenance_record

__all__ = ["search_plan", "check_budget_early"]


def check_budget_early(targets, budget: str, lowest: int, group_size: int, format: str | None = None) -> None:
    """A budget that does not parse, or that every row at the ``lowest`` width allowed already
    exceeds (in ``format``'s bytes if given), refused before minutes of sensitivity pass (the
    allocators check it again, exactly)."""
    from ..cost import budget_to_bytes, check_budget_fits, plan_bytes

    n_weights = sum(t.numel for t in targets)
    if format is not None:
        from ..export import get_exporter

        exp = get_exporter(format)
        low = max(lowest, 2)
        if exp.widths is not None:  # the format's smallest width at or above it
            low = min((b for b in exp.widths if b >= low), default=max(exp.widths))
        need = sum(exp.module_bytes(t.out_features, t.in_features, low, group_size) for t in targets)
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
    from ..cost import avg_bits, budget_to_bytes
    from ..io.plan import BitPlan
    from ..sensitivity.table import format_mix
    from . import allocator_from_config, build_problem

    if config.budget is None:
        raise BitsearchError("search needs a budget: avg bits (e.g. 2.5) or bytes (12MB, 12MiB)")
    allocator = allocator or allocator_from_config(config)
    menu = parse_bits(config.bits) if config.bits is not None else table.bits
    mix = table.resolve_mix(config.mix)
    problem = build_problem(table, targets, menu, config.min_bits, config.max_bits, mix)
    if config.format is not None:
        from .formats import format_problem

        if allocator.name != "ilp" or config.granularity != "layer":
            raise BitsearchError("a plan for a format takes one width per module: method ilp, granularity layer")
        problem = format_problem(problem, {t.name: (t.out_features, t.in_features) for t in targets}, config.format)
    budget_bytes = budget_to_bytes(config.budget, problem.n_weights)
    if budget_bytes > problem.max_useful_bytes():
        note(
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
        from .coupled import allocate_coupled

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
        from .formats import format_bytes

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
        **provenance_record(),
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
