"""Figures, drawn from saved artifacts (tables, plans, studies, result tables): used by the CLI's
``plot`` command, the demo, ``analysis/`` and the studies."""

from .benchmark import plot_confidence, plot_methods
from .cost import plot_stage_costs
from .pareto import pareto_figure, plot_pareto
from .plan import plot_layer_bits, plot_plan
from .results import plot_gguf_presets, plot_ppl_vs_bits
from .runs import plot_runs
from .sensitivity import plot_sensitivity

__all__ = [
    "pareto_figure",
    "plot_confidence",
    "plot_layer_bits",
    "plot_methods",
    "plot_pareto",
    "plot_plan",
    "plot_ppl_vs_bits",
    "plot_gguf_presets",
    "plot_runs",
    "plot_sensitivity",
    "plot_stage_costs",
]
