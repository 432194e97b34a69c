"""Process plumbing for spawned worker ranks (benchmarks, the torchrun demo, tests).

Not collectives (those live in amp_engine.distributed): how a gloo rank ends
without racing its peers.
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

__all__ = ["shutdown_process_group", "exit_spawned_rank"]


def shutdown_process_group() -> None:
    """Tear down the default process group without racing the other ranks.

    A gloo rank that destroys its group while a peer is still finishing the
    last collective makes the peer's transport thread throw, which aborts that
    process ("terminate called without an active exception"). A barrier first
    means every rank is done with its collectives before any connection closes.
    """
    if not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_spawned_rank() -> None:
    """End a spawned worker rank whose results are already written: barrier, then exit
    without tearing gloo down.

    Even after a barrier, gloo's teardown (destroy_process_group and the destructors
    at interpreter exit) occasionally aborts a rank on a loaded machine ("terminate
    called without an active exception"), failing a run whose work is complete.
    Workers of torch.multiprocessing (tests, benchmarks) exit with os._exit(0) after
    the barrier instead; the operating system releases the sockets. Not for ranks
    that go on running code.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
