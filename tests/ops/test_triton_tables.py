"""CUDA-graph safety of the Triton launch tables (amp_engine.ops.triton_tables).

A graph captured with a table bakes the table's device address into its kernels:
a table used during capture must never be evicted (freed) while the graph may
replay, and none may be built during capture. The policy is tested here on the
CPU by pretending the stream is capturing (monkeypatched ``is_capturing``); the
real capture runs in tests/test_cuda_graphs.py and scripts/gpu_check.sh on a GPU.
"""
import os

import pytest
import torch

from amp_engine.ops.triton import tables as triton_tables
from amp_engine.ops.triton.tables import CaptureError, LaunchTables, release_captured_tables

CPU = torch.device("cpu")


@pytest.fixture
def capturing(monkeypatch):
    """capturing(True/False): what is_capturing answers from now on."""
    state = {"on": False}
    monkeypatch.setattr(triton_tables, "is_capturing", lambda device: state["on"])

    def set_(on: bool) -> None:
        state["on"] = on
    yield set_
    release_captured_tables()


def counting_builder(built):
    def builder(key):
        def build():
            built.append(key)
            return torch.zeros(1)  # a fresh object per build: identity tells reuse
        return build
    return builder


def test_cache_evicts_least_recently_used_and_rebuilds():
    built = []
    make = counting_builder(built)
    cache = LaunchTables("test", capacity=2)
    a = cache.get(1, CPU, make(1))
    cache.get(2, CPU, make(2))
    assert cache.get(1, CPU, make(1)) is a  # a hit refreshes 1: 2 is now the oldest
    cache.get(3, CPU, make(3))
    assert cache.get(1, CPU, make(1)) is a and built == [1, 2, 3]
    cache.get(2, CPU, make(2))  # evicted: built again
    assert built == [1, 2, 3, 2] and len(cache) == 2


def test_table_used_during_capture_is_pinned_never_evicted(capturing):
    built = []
    make = counting_builder(built)
    cache = LaunchTables("test", capacity=2)
    warm = cache.get("graph", CPU, make("graph"))  # the warm-up builds it
    capturing(True)
    assert cache.get("graph", CPU, make("graph")) is warm  # captured: pinned
    capturing(False)
    assert cache.pinned() == 1
    for k in range(10):  # far more layouts than the capacity
        cache.get(k, CPU, make(k))
    assert cache.get("graph", CPU, make("graph")) is warm  # never rebuilt, never freed
    assert built.count("graph") == 1 and len(cache) == 3  # 2 recent + 1 pinned
    assert release_captured_tables() >= 1 and cache.pinned() == 0


def test_no_table_is_built_during_capture(capturing):
    built = []
    cache = LaunchTables("test", capacity=4)
    capturing(True)
    with pytest.raises(CaptureError, match="Warm up first") as err:
        cache.get("new", CPU, counting_builder(built)("new"))
    assert "zero_grad(set_to_none=False)" in str(err.value) and built == []
    assert len(cache) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        LaunchTables("test", capacity=0)


def test_not_capturing_off_cuda():
    assert triton_tables.is_capturing(CPU) is False


# ------------------------------------------- through the real launchers (interpreter)
needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in __import__("amp_engine").ops.available_backends("cpu"),
    reason="the Triton launchers run CPU tensors only under TRITON_INTERPRET=1 (with triton and numpy)")


@needs_triton
def test_scaling_launcher_pins_its_captured_table(capturing):
    from amp_engine.ops.triton import scaling as tk

    grads = [torch.randn(n) for n in (5, 123, 4097)]
    inv, found = torch.tensor(0.5), torch.zeros(())
    tk.TABLES.clear()
    tk.unscale_and_check_(grads, inv, found)  # warm-up: builds the table
    capturing(True)
    tk.unscale_and_check_(grads, inv, found)
    capturing(False)
    pinned = tk._plan(grads, CPU).meta
    for _ in range(tk.TABLES.capacity + 5):  # fill the cache with other layouts
        tk.unscale_and_check_([torch.randn(7)], inv, found)
    assert tk._plan(grads, CPU).meta is pinned and tk.TABLES.pinned() == 1
    capturing(True)
    with pytest.raises(CaptureError, match="loss-scaling ops"):
        tk.unscale_and_check_([torch.randn(9)], inv, found)


@needs_triton
def test_optimizer_launcher_pins_its_captured_table(capturing):
    from amp_engine import ops
    from amp_engine.ops.triton import optim as triton_optim

    def lists(n):
        params = [torch.randn(n)]
        return (params, [torch.randn(n)], [], [torch.zeros(n)], [torch.zeros(())])

    mine = lists(33)
    triton_optim.TABLES.clear()
    ops.sgd_step_(*mine, lr=0.1, momentum=0.9, backend="triton")  # warm-up
    capturing(True)
    ops.sgd_step_(*mine, lr=0.1, momentum=0.9, backend="triton")
    capturing(False)
    assert triton_optim.TABLES.pinned() == 1
    for _ in range(triton_optim.TABLES.capacity + 3):
        ops.sgd_step_(*lists(5), lr=0.1, momentum=0.9, backend="triton")
    assert triton_optim.TABLES.pinned() == 1
    capturing(True)
    ops.sgd_step_(*mine, lr=0.1, momentum=0.9, backend="triton")  # still served: no build
    with pytest.raises(CaptureError, match="optimizer steps"):
        ops.sgd_step_(*lists(6), lr=0.1, momentum=0.9, backend="triton")
