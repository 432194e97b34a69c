"""The demo on several processes: ``torchrun --nproc-per-node 2 -m amp_engine demo``.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) every process trains
the same runs with its model wrapped in ``DistributedDataParallel``: each rank
takes its slice of every global batch (same global batch as one process,
``--batch-size`` is the global size), DDP averages the grads, and amp_engine's
GradScaler MAX-reduces found_inf over DDP's group, so every rank skips the same
steps and all keep identical weights. Rank 0 alone prints and writes files.
Backend: gloo on the CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``).
A process group that already exists (a caller's) is used as it is.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from amp_engine.bench.processes import shutdown_process_group


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP when there are several ranks (its parameters are the same objects)."""
        if self.world == 1:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def local_rows(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of every tensor of a global batch (dim 0)."""
        if self.world == 1:
            return batch
        return tuple(t.tensor_split(self.world)[self.rank] for t in batch)

    def mean(self, value: float) -> float:
        """The mean of a per-rank float over the ranks (the global batch's loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)  # gloo group or not: a CPU tensor needs a CPU-capable group
        return float(t) / self.world


def _world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def session(opts) -> Iterator[tuple[Ranks, object]]:
    """(Ranks, opts for this rank): joins torchrun's process group for the demo's duration.

    Creates the group from the torchrun environment when there is none (and
    destroys it after); on CUDA pins ``cuda:LOCAL_RANK``. The CPU uses gloo;
    with NCCL a gloo group is added for the host-side loss averages.
    """
    created = False
    if not dist.is_initialized() and _world_from_env() > 1:
        if opts.batch_size < _world_from_env():
            raise ValueError(f"batch_size={opts.batch_size} is the global batch: it needs at least "
                             f"one sequence per rank ({_world_from_env()} ranks)")
        if opts.resolved_device().type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            opts = replace(opts, device=f"cuda:{local}")
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        created = True
    ranks = Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Ranks()
    try:
        yield ranks, opts
    finally:
        if created:
            shutdown_process_group()
