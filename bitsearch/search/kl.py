"""Measure a plan's real effect fast: KL(float || quantized) on calibration tokens.

Model-in-the-loop searches (``optuna``) evaluate many plans. :class:`PlanKL` caches, once,
the float model's next-token log-probabilities on a few calibration samples and every target's
fake-quantized weight at every width of the menu (a (n_bits, out, in) stack per layer, in the
weight's dtype), so judging a plan is one gather per layer and one forward pass:

    KL = mean over predicted positions of sum_v p_float(v) (log p_float(v) - log p_plan(v))

The model's weights are restored after every call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import Target
from ..quant.grid import fake_quantize

__all__ = ["PlanKL", "rounded_stack"]


def rounded_stack(w: torch.Tensor, bits: list[int], group_size: int) -> torch.Tensor:
    """(len(bits), out, in): ``w``'s round-to-nearest weight at every width of ``bits``, in w's dtype."""
    return torch.stack([fake_quantize(w.float(), b, group_size).to(w.dtype) for b in bits])


class PlanKL:
    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        batch: torch.Tensor,
        bits: list[int],
        group_size: int,
        micro_batch: int = 8,
        share: "PlanKL | None" = None,
    ):
        """``share``: another PlanKL of the same model, targets, menu and group size whose float
        copies and quantized stacks are reused (one cache for the search and validation batches:
        the cache holds (len(bits) + 1) x the target weights)."""
        self.model = model
        self.targets = targets
        self.bits = list(bits)
        self.micro_batch = micro_batch
        self.dev = next(model.parameters()).device
        self.batch = batch
        self.weights = {t.name: model.get_submodule(t.name).weight for t in targets}
        if share is not None:
            if share.model is not model or share.bits != self.bits or set(share.stack) != set(self.weights):
                raise ValueError("PlanKL(share=...) needs the same model, targets and menu")
            self.float_w, self.stack = share.float_w, share.stack
        else:
            self.float_w = {n: w.detach().clone() for n, w in self.weights.items()}
            self.stack = {n: rounded_stack(w, self.bits, group_size) for n, w in self.float_w.items()}
        self.ref = [lp.to(torch.bfloat16) if lp.numel() > 2**27 else lp for lp in self._logprobs()]
        self.calls = 0

    @torch.no_grad()
    def _logprobs(self) -> list[torch.Tensor]:
        out = []
        for i in range(0, self.batch.shape[0], self.micro_batch):
            x = self.batch[i : i + self.micro_batch].to(self.dev)
            out.append(F.log_softmax(self.model(input_ids=x, use_cache=False).logits[:, :-1].float(), dim=-1))
        return out

    @torch.no_grad()
    def __call__(self, widths: dict[str, np.ndarray]) -> float:
        """KL of the model whose targets take ``widths`` (per layer, per channel; from the menu)."""
        index = {b: k for k, b in enumerate(self.bits)}
        try:
            for name, w in self.weights.items():
                k = torch.as_tensor(np.vectorize(index.__getitem__)(widths[name]), device=w.device)
                w.copy_(self.stack[name][k, torch.arange(w.shape[0], device=w.device)])
            total, count = 0.0, 0
            for ref, x0 in zip(self.ref, range(0, self.batch.shape[0], self.micro_batch)):
                x = self.batch[x0 : x0 + self.micro_batch].to(self.dev)
                lp = F.log_softmax(self.model(input_ids=x, use_cache=False).logits[:, :-1].float(), dim=-1)
                r = ref.float()
                total += float((r.exp() * (r - lp)).sum())
                count += lp.shape[0] * lp.shape[1]
        finally:
            for name, w in self.weights.items():
                w.copy_(self.float_w[name])
        self.calls += 1
        return total / count
