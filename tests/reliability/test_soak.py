"""Soak (slow, on demand: ``python -m pytest -m slow tests/reliability/test_soak.py``).

Thousands of CPU steps with random faults (20% of the steps) through the bare
GradScaler + fused AdamW and through the trainer. After a warm-up, at every
block of steps: the number of live tensors (gc-tracked) is constant (no per-step
tensor kept alive), Python allocations (tracemalloc) and the resident set do not
grow, and the median host time per step stays flat.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time
import tracemalloc
import warnings

import pytest
import torch

import amp_engine
from amp_engine.optim import AdamW

from .faults import FaultPlan, Injector, batch, mlp, mse

pytestmark = pytest.mark.slow
WARMUP, BLOCK = 500, 500


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _driver(path: str):
    """(model, step(step_index, fault) -> None)."""
    if path == "bare":
        model = mlp(torch.float16, seed=0)
        opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        scaler = amp_engine.GradScaler("cpu", init_scale=2.0**8, growth_interval=5, floor_patience=0)
        inj = Injector(model)

        def step(i, fault):
            opt.zero_grad(set_to_none=True)
            inj.arm(fault)
            x, y = batch(i, 0, seed=1)
            scaler.scale(inj.loss(mse(model(x.half()), y))).backward()
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
        return model, inj, step
    model = mlp(torch.float32, seed=0)
    trainer = amp_engine.create_mixed_precision_trainer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-3), memory_efficient=True,
        max_grad_norm=1.0, growth_interval=5, init_scale=2.0**8, log_amp_stats=False,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    inj = Injector(model)

    def step(i, fault):
        inj.arm(fault)
        trainer.train_step(batch(i, 0, seed=1), lambda out, y: inj.loss(mse(out, y)), "cpu")
    return model, inj, step


@pytest.mark.parametrize("path,steps", [("bare", 6000), ("trainer", 4000)])
def test_memory_and_step_time_stay_flat(path, steps):
    model, inj, step = _driver(path)
    n_params = len(list(model.parameters()))
    dtypes = [torch.float16] * n_params
    plan = FaultPlan(seed=3, rate=0.2, accumulate=1, n_params=n_params, kinds=("grad", "loss"))
    tracemalloc.start()
    try:
        marks, times = [], []
        for i in range(steps):
            fault = plan.fault(i, 2.0**8, dtypes)
            t0 = time.perf_counter()
            step(i, fault)
            times.append(time.perf_counter() - t0)
            if i + 1 >= WARMUP and (i + 1) % BLOCK == 0:
                marks.append((_live_tensors(), tracemalloc.get_traced_memory()[0], _rss_mb()))
    finally:
        tracemalloc.stop()
    assert inj.fired > steps // 10  # the faults happened
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tensors = [m[0] for m in marks]
    assert max(tensors) - min(tensors) <= 2, f"live tensors per block: {tensors}"
    python_growth = marks[-1][1] - marks[0][1]
    assert python_growth < 256 * 1024, f"Python allocations grew by {python_growth} B: {marks}"
    rss_growth = marks[-1][2] - marks[0][2]
    assert rss_growth < 32, f"resident set grew by {rss_growth:.1f} MB: {marks}"
    blocks = [statistics.median(times[s:s + BLOCK]) for s in range(WARMUP, steps, BLOCK)]
    # host time per step: flat (the medians of later blocks vs the first one after warm-up;
    # generous, the machine is shared)
    assert max(blocks[1:]) < 1.5 * blocks[0] + 1e-4, f"median step time per block: {blocks}"
