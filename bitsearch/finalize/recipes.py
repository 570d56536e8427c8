"""The finalizers' defaults, chosen by measurement (docs/finalize.md): the options of a
:class:`bitsearch.config.FinalizeConfig` left at ``None`` (``init``, ``mode``, ``steps``, ``lr``,
``trainable``) take the values of the recipe for its method and mode.

    qat, mode e2e (the default)   SignRound's rounding, then the step sizes alone end to end with
                                  the codes and zeros frozen: 100 steps at lr 2e-5
    qat, mode tiled, tiled+e2e    from round-to-nearest, weights, step sizes and zeros trained:
                                  200 steps a tile at lr 1e-4
    signround, gptq               from round-to-nearest

Measured on slm-llama-17m (perplexity on the whole wikitext2 test set / held-out KL): on the
2.5-bit greedy plan SignRound then the step sizes gives 228.13 / 0.0427, tiled QAT from
round-to-nearest 230.36 / 0.0491; at uniform W2 g64 233.56 / 0.0662 against AutoRound's
234.39 / 0.0682.
"""

from __future__ import annotations

from dataclasses import replace

__all__ = ["DEFAULT_MODE", "RECIPES", "resolve_defaults"]

DEFAULT_MODE = "e2e"

RECIPES: dict[str, dict] = {
    "e2e": dict(init="signround", trainable="scales", steps=100, lr=2e-5),
    "tiled": dict(init="rtn", trainable="all", steps=200, lr=1e-4),
    "tiled+e2e": dict(init="rtn", trainable="all", steps=200, lr=1e-4),
}

# the fields a recipe fills
FIELDS = ("mode", "init", "trainable", "steps", "lr")


def resolve_defaults(config):
    """``config`` with every recipe field left at ``None`` filled from the recipe of its method and
    mode (a new object; ``config`` itself when nothing is left to fill)."""
    if all(getattr(config, f, None) is not None for f in FIELDS):
        return config
    mode = config.mode or DEFAULT_MODE
    recipe = dict(RECIPES.get(mode, RECIPES[DEFAULT_MODE]), mode=mode)
    if config.method != "qat":
        recipe["init"] = "rtn"  # the rounders start from round-to-nearest
    return replace(config, **{f: recipe[f] for f in FIELDS if getattr(config, f) is None})
