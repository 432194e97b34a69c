"""The Triton launchers' cache of device launch tables, safe under CUDA graph capture.

A launch table (int64 on the grads' device: data pointers, sizes, chunk map) is
built once per tensor layout and reused, so a steady training loop copies none.
A CUDA graph captured with a table bakes the table's device address into its
kernel arguments: if the cache evicted (freed) that table, every later replay
would read freed memory. The policy, for both launchers:

* a table used while the current stream is capturing is **pinned**: moved out of
  the bounded cache into a set that is never evicted (a graph may replay at any
  time after its capture; tables are small, a few bytes per tensor);
  :func:`release_captured_tables` drops them once the graphs are gone;
* a table is never **built** during capture: building copies host memory to the
  device, and a captured copy would re-read that host buffer at each replay (and
  allocating pinned memory is not allowed while capturing). The step must run
  once before capture with the same tensors (the usual warm-up), which builds it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

_ALL: list["LaunchTables"] = []


def is_capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of `device` is being captured into a graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class CaptureError(RuntimeError):
    """A launch table was needed for the first time during CUDA graph capture."""


class LaunchTables(Generic[T]):
    """A cache of at most `capacity` tables (least recently used evicted first),
    plus the tables pinned by capture (never evicted)."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.name, self.capacity = name, capacity
        self._recent: OrderedDict[Hashable, T] = OrderedDict()
        self._pinned: dict[Hashable, T] = {}
        _ALL.append(self)

    def get(self, key: Hashable, device: torch.device, build: Callable[[], T]) -> T:
        """The table for `key`, built by `build()` on a miss (never during capture)."""
        table = self._pinned.get(key)
        if table is not None:
            return table
        capturing = is_capturing(device)
        table = self._recent.get(key)
        if table is None:
            if capturing:
                raise CaptureError(
                    f"amp_engine's Triton backend ({self.name}) met tensors it has not launched on "
                    f"before while a CUDA graph is being captured on {device}: its launch table "
                    "cannot be built during capture. Warm up first: run the same step once before "
                    "capturing, with the tensors the graph will use (e.g. zero_grad(set_to_none="
                    "False) before the warm-up and the capture, so the grads keep their addresses), "
                    "or use the compiled 'cuda' backend, which needs no table.")
            table = build()
            self._recent[key] = table
            if len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        if capturing:  # the graph holds the table's address from now on
            self._pinned[key] = self._recent.pop(key)
        return table

    def pinned(self) -> int:
        """How many tables captured graphs may still use."""
        return len(self._pinned)

    def __len__(self) -> int:
        return len(self._recent) + len(self._pinned)

    def clear(self) -> None:
        """Drop every table, pinned ones too (see :func:`release_captured_tables`)."""
        self._recent.clear()
        self._pinned.clear()


def release_captured_tables() -> int:
    """Unpin the tables of every launcher; returns how many were pinned.

    Call it only once every CUDA graph captured with amp_engine's Triton backend has
    been deleted: a graph replayed after this may read freed memory.
    """
    n = 0
    for cache in _ALL:
        n += len(cache._pinned)
        cache._pinned.clear()
    return n
