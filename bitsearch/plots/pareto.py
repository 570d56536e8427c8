"""The trade-off of an optuna search study: every trial, its (KL, size) front, the budget and,
when measured, uniform round-to-nearest points — one PNG."""

from __future__ import annotations

__all__ = ["plot_pareto", "pareto_figure"]


def plot_pareto(
    rows: list[dict], out: str, budget_bits: float | None = None, uniform: list[dict] | None = None, title: str = ""
) -> str:
    """``rows``: trials as from ``search.optuna_study.pareto_rows`` (avg_bits, kl, on_front);
    ``uniform``: [{"label", "avg_bits", "kl"}] measured the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path
    from ..errors import BitsearchError

    if not rows:
        raise BitsearchError("the study has no finished trial to plot")
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    ax.scatter(
        [r["avg_bits"] for r in rows],
        [r["kl"] for r in rows],
        s=14,
        color="tab:blue",
        alpha=0.35,
        label=f"trials ({len(rows)})",
    )
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["avg_bits"])
    ax.plot(
        [r["avg_bits"] for r in front], [r["kl"] for r in front], "o-", color="tab:blue", label=f"front ({len(front)})"
    )
    inside = [r for r in rows if r.get("within_budget", True)]
    if inside:
        best = min(inside, key=lambda r: r["kl"])
        ax.scatter(
            [best["avg_bits"]],
            [best["kl"]],
            s=90,
            facecolors="none",
            edgecolors="tab:red",
            lw=1.5,
            label=f"chosen: trial {best['trial']}",
            zorder=5,
        )
    for u in uniform or []:
        ax.scatter([u["avg_bits"]], [u["kl"]], marker="s", color="tab:gray", zorder=4)
        ax.annotate(u["label"], (u["avg_bits"], u["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if uniform:
        ax.scatter([], [], marker="s", color="tab:gray", label="uniform RTN")
    if budget_bits is not None:
        ax.axvline(budget_bits, color="black", lw=0.8, ls=":", label=f"budget {budget_bits:.3f} bits")
    ax.set_xlabel("avg bits per target weight (all-in)")
    ax.set_ylabel("KL(float || quantized) on calibration tokens")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def pareto_figure(storage: str, out: str, study_name: str | None = None, model=None, calib=None, config=None) -> str:
    """The PNG of a study's trials and front; with ``model`` and ``calib`` also uniform RTN points,
    their KL measured on ``config.kl_samples`` calibration samples like the study's trials
    (``config``: a :class:`bitsearch.config.PlotParetoConfig`)."""
    import numpy as np

    from ..config import CalibConfig, PlotParetoConfig
    from ..cost import avg_bits, plan_bytes
    from ..errors import BitsearchError
    from ..inputs import calibration_tokens, resolve_model
    from ..models import model_fingerprint, target_of
    from ..quant.grid import QUANT_WIDTHS
    from ..search.kl import PlanKL
    from ..search.optuna_study import StudySettings, only_study, open_study, pareto_rows

    config = config or PlotParetoConfig()
    name = only_study(storage, study_name)
    study = open_study(StudySettings(storage=storage, study_name=name), create=False)
    attrs = study.user_attrs
    rows = pareto_rows(study, attrs.get("budget_bytes"))
    n_w = attrs["n_weights"]
    uniform = []
    if model is not None:
        if calib is None:
            raise BitsearchError("uniform points need calibration text as well as the model")
        loaded = resolve_model(model, config)
        modules = dict(loaded.model.named_modules())
        if any(n not in modules for n in attrs["layers"]):
            raise BitsearchError("the study was run on another model than this one")
        targets = [target_of(n, modules[n]) for n in attrs["layers"]]
        if model_fingerprint(loaded.model, targets)["sha256"] != attrs["model"]["sha256"]:
            raise BitsearchError("the study was run on another model than this one")
        widths = [b for b in attrs["menu"] if b in QUANT_WIDTHS]
        calib_config = CalibConfig(
            samples=config.kl_samples,
            seq_len=config.seq_len,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
            show_progress=config.show_progress,
        )
        batch, _ = calibration_tokens(loaded, calib, calib_config, what="the uniform points")
        kl = PlanKL(loaded.model, targets, batch, widths, attrs["group_size"])
        shapes = {t.name: (t.out_features, t.in_features) for t in targets}
        for w in widths:
            bits = {t.name: np.full(t.out_features, w) for t in targets}
            uniform.append(
                {
                    "label": f"W{w}",
                    "avg_bits": avg_bits(plan_bytes(shapes, bits, attrs["group_size"]), n_w),
                    "kl": kl(bits),
                }
            )
    return plot_pareto(
        rows, out, budget_bits=avg_bits(attrs["budget_bytes"], n_w), uniform=uniform, title=f"study {name}"
    )
