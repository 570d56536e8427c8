"""Data-parallel sensitivity under ``torchrun``: each rank takes every ``world``-th micro-batch
of the calibration batch and accumulators are summed across ranks.

Micro-batch j is always ``batch[j*m:(j+1)*m]`` and anything random about it (Hutchinson probes)
is seeded by j, so a run on N processes sums exactly the terms a single process sums: the
tables agree up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "from_env"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, j: int) -> bool:
        return j % self.world == self.rank

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (no-op on one process); returns ``t``."""
        if self.world > 1:
            import torch.distributed as tdist

            if self.backend == "gloo" and t.device.type != "cpu":
                cpu = t.cpu()
                tdist.all_reduce(cpu)
                t.copy_(cpu)
            else:
                tdist.all_reduce(t)
        return t

    def sum_float(self, x: float) -> float:
        return float(self.all_reduce(torch.tensor([x], dtype=torch.float64)).item()) if self.world > 1 else x

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()


def from_env(device: str = "cpu") -> tuple[Dist, str]:
    """The process group ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK), initialised on
    first use: gloo for CPU, nccl for CUDA (one GPU per local rank). Returns (dist, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as tdist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, backend=backend), device
