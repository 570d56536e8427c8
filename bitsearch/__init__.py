"""bitsearch: per-channel bit-width search for LLM quantization under a memory budget.

    import bitsearch
    plan = bitsearch.search(model, "heldout.txt", bitsearch.SearchConfig(budget=2.5))
    packed = bitsearch.apply(model, plan, out="packed/")

The stages (``sensitivity``, ``search``, ``apply``, ``finalize``, ``evaluate``, ``export``) take a
model (an ``nn.Module`` or a folder / hub id), their inputs and a config object; see
:mod:`bitsearch.api` and :mod:`bitsearch.config`. Names are imported on first use, so
``import bitsearch`` stays light.

Four stage functions share their names with subpackages (``bitsearch.search``, ``.sensitivity``,
``.finalize``, ``.export``) and two with modules (``.evaluate``, ``.generate``): the
attribute is the function, and the subpackage is reached by ``from bitsearch.search import ...``.
"""

import sys
import types

__version__ = "0.2.0"

from .errors import BitsearchError  # noqa: E402

_API = ("sensitivity", "search", "search_plan", "apply", "finalize", "evaluate", "export", "generate")
_CONFIG = (
    "RunConfig",
    "CalibConfig",
    "SensitivityConfig",
    "SearchConfig",
    "FinalizeConfig",
    "ApplyConfig",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
)
_OTHER = {"BitPlan": "io.plan", "SensitivityTable": "sensitivity", "EvalResult": "evaluate", "load_model": "io.loading"}

__all__ = ["__version__", "BitsearchError", *_API, *_CONFIG, *_OTHER]


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the subpackage ``bitsearch.search`` would bind it over the function ``search``
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(".generate" if name == "generate" else ".api", __name__), name)
    if name in _CONFIG:
        return getattr(importlib.import_module(".config", __name__), name)
    if name in _OTHER:
        return getattr(importlib.import_module("." + _OTHER[name], __name__), name)
    raise AttributeError(f"module 'bitsearch' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
