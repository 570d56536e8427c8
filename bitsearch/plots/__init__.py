"""Figures, drawn from saved artifacts (tables, plans, studies, result tables): used by the CLI's
``plot`` command, the demo, ``analysis/`` and the studies."""

from .pareto import pareto_figure, plot_pareto
from .plan import plot_plan
from .results import plot_ppl_vs_bits
from .sensitivity import plot_sensitivity

__all__ = ["pareto_figure", "plot_pareto", "plot_plan", "plot_ppl_vs_bits", "plot_sensitivity"]
