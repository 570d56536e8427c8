"""Input statistics of target layers, collected by forward pre-hooks.

For a linear target with inputs x (one row per token) we accumulate either the diagonal
``sum_t x_tj^2`` ("diag", what ``imatrix`` needs) or the full second moment ``sum_t x_t x_t^T``
("full", what ``snr`` needs; its diagonal is the imatrix). Targets fed the very same tensor
(q/k/v, gate/up) share one accumulator. Sums are float64; :meth:`InputStats.mean` divides by
the token count after the sums have been all-reduced across ranks.

An embedding target's "input" is the token id: its statistic is each token's count, so a
token's row is weighted by how often it occurs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import Dist

__all__ = ["InputStats"]


class InputStats:
    def __init__(self, modules: dict[str, nn.Module], kind: str):
        assert kind in ("diag", "full")
        self.modules = modules
        self.kind = kind
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = []

    def __enter__(self) -> "InputStats":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def _hook(self, name: str):
        embedding = isinstance(self.modules[name], nn.Embedding)

        def fn(_mod, args):
            x = args[0]
            if self._last is not None and self._last[0] is x and not embedding:
                self.alias[name] = self._last[1]
                return
            self._last = (x, name)
            if embedding:
                ids = x.reshape(-1)
                n = self.modules[name].num_embeddings
                acc = torch.bincount(ids, minlength=n).double()
                rows = ids.numel()
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                acc = (x2.T @ x2).double() if self.kind == "full" else x2.pow(2).sum(0).double()
                rows = x2.shape[0]
            if name in self.sums:
                self.sums[name] += acc
            else:
                self.sums[name] = acc
            self.counts[name] = self.counts.get(name, 0) + rows

        return fn

    def end_pass(self) -> None:
        """Call after each forward pass: a later pass's tensor must not alias this one's."""
        self._last = None

    def all_reduce(self, dist: Dist) -> None:
        for name in sorted(self.sums):
            dist.all_reduce(self.sums[name])
            self.counts[name] = int(dist.sum_float(float(self.counts[name])))

    def total(self, name: str) -> torch.Tensor:
        """Summed statistic of target ``name`` over every token seen (X^T X for "full")."""
        return self.sums[self.alias.get(name, name)]

    def mean(self, name: str) -> torch.Tensor:
        """Mean statistic of target ``name`` (token frequencies for an embedding)."""
        return self.total(name) / max(self.counts[self.alias.get(name, name)], 1)
