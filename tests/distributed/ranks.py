"""Run a function on 2 real gloo ranks (spawned CPU processes), bounded in time.

Every test file spawns once (a module-scoped fixture runs all its scenarios in
one launch): starting two processes that import torch costs seconds on the
shared 2-core machines. The store is a file in a fresh temporary folder, so
no TCP port can be taken by another run. A rank that raises makes ``join``
raise with its traceback; a rank that hangs (a collective the other rank never
reaches) is killed at ``timeout`` and the test fails instead of hanging.
"""
from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amp_engine.bench.processes import exit_spawned_rank, shutdown_process_group

WORLD = 2

requires_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                   reason="torch.distributed with gloo is not available")


def _entry(rank: int, fn, args: tuple, folder: str, world: int) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores: no OpenMP spinning
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        shutdown_process_group()
        raise
    exit_spawned_rank()  # results are written: skip gloo's teardown


def run_on_ranks(fn, *args, world: int = WORLD, timeout: float = 150.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the ranks' results in order.

    ``fn`` must be importable by name (a module-level function) and return
    something ``torch.save`` can write. The default process group is up when
    it runs (``torch.distributed.group.WORLD``); each rank uses one thread.
    """
    with tempfile.TemporaryDirectory(prefix="amp_engine_ranks_") as folder:
        ctx = mp.start_processes(_entry, args=(fn, args, folder, world), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {world}-rank gloo run did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]


class CollectiveCounter:
    """Counts the all-reduces amp_engine itself issues (not DDP's or FSDP's): ``with`` it."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> "CollectiveCounter":
        import sys

        self._saved = dist.all_reduce

        def counting(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("amp_engine", "distributed.py")):
                self.calls += 1
            return self._saved(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._saved
