"""The whole AMP step without a host sync, so that a CUDA graph can capture it:
scale, backward, ``clip_grad_norm_`` (norm + overflow check in one pass), the fused
``capturable=True`` optimizer step (skipped on the device), ``update()``.

On the CPU: every Tensor method that copies a value to the host is counted
(none may run). On a GPU: the step runs under ``torch.cuda.set_sync_debug_mode("error")``,
and 20 steps with injected infs are captured once and replayed, matching eager.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from amp_engine import GradScaler
from amp_engine.optim import SGD, AdamW

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
STEPS = 20
BAD_STEPS = (3, 4, 11)  # the input holds an inf: every grad is non-finite, the step is skipped


@contextlib.contextmanager
def host_reads():
    """Record every call of a Tensor method that reads a value on the host."""
    calls = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, fn):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in saved.items():
        setattr(torch.Tensor, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def build(device, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(device)


def make_optimizer(name, model):
    if name == "adamw":
        return AdamW(model.parameters(), lr=1e-2, capturable=True)
    return SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, capturable=True)


def data(step, device):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
    if step in BAD_STEPS:
        x[0, 0] = math.inf
    return x.to(device), y.to(device)


def amp_step(model, opt, scaler, x, y, device):
    """One whole step, the same code eager and captured."""
    # no autocast weight cache: a captured graph must recompute the casts at every replay
    with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                        cache_enabled=False):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    norm = scaler.clip_grad_norm_(opt, 1.0)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), norm


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_the_whole_step_reads_nothing_on_the_host(opt_name):
    device = torch.device("cpu")
    model = build(device)
    model[2].to(torch.bfloat16)  # low-precision params with fp32 masters too
    opt = make_optimizer(opt_name, model)
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    x, y = data(0, device)
    amp_step(model, opt, scaler, x, y, device)  # the first step creates the lazy state
    with host_reads() as calls:
        for i in range(1, 8):
            x, y = data(i, device)
            opt.zero_grad(set_to_none=False)  # grads stay put, as in a captured graph
            amp_step(model, opt, scaler, x, y, device)
    assert calls == []
    stats = scaler.stats()
    assert stats["skipped_steps"] == 2 and stats["steps"] == 8  # the skips (steps 3 and 4) happened
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _eager(opt_name, device):
    model = build(device)
    opt = make_optimizer(opt_name, model)
    scaler = GradScaler("cuda", init_scale=2.0**8, growth_interval=3)
    scales = []
    for i in range(STEPS):
        x, y = data(i, device)
        opt.zero_grad(set_to_none=True)
        amp_step(model, opt, scaler, x, y, device)
        scales.append(scaler.get_scale())
    return model, opt, scaler, scales


def _graphed(opt_name, device, warmup=3):
    """Warm up on a side stream, capture one whole step, replay it for the remaining steps."""
    model = build(device)
    opt = make_optimizer(opt_name, model)
    scaler = GradScaler("cuda", init_scale=2.0**8, growth_interval=3)
    static_x, static_y = (t.clone() for t in data(0, device))
    scales = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):  # lazy state, autocast caches, cuBLAS handles
            x, y = data(i, device)
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            amp_step(model, opt, scaler, static_x, static_y, device)
            scales.append(scaler.get_scale())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    x, y = data(warmup, device)
    static_x.copy_(x)
    static_y.copy_(y)
    with torch.cuda.graph(graph):  # capturing runs nothing: the first replay is step `warmup`
        amp_step(model, opt, scaler, static_x, static_y, device)
    for i in range(warmup, STEPS):
        x, y = data(i, device)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        scales.append(scaler.get_scale())
    return model, opt, scaler, scales


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_captured_step_replays_like_eager(opt_name):
    device = torch.device("cuda")
    m_e, o_e, s_e, scales_e = _eager(opt_name, device)
    m_g, o_g, s_g, scales_g = _graphed(opt_name, device)
    assert scales_g == scales_e
    assert s_g._stats.skipped_steps() == s_e._stats.skipped_steps() == len(BAD_STEPS)
    for a, b in zip(m_e.parameters(), m_g.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for pa, pb in zip(m_e.parameters(), m_g.parameters()):
        for key, t in o_e.state[pa].items():
            torch.testing.assert_close(t, o_g.state[pb][key], rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@needs_cuda
def test_eager_step_has_no_cuda_sync():
    device = torch.device("cuda")
    model = build(device)
    opt = make_optimizer("adamw", model)
    scaler = GradScaler("cuda", init_scale=2.0**8, growth_interval=3, floor_patience=0)
    batches = [data(i, device) for i in range(6)]  # host-to-device copies of pageable memory sync
    for i, (x, y) in enumerate(batches):
        if i >= 2:  # after the lazy state exists
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.zero_grad(set_to_none=False)
            amp_step(model, opt, scaler, x, y, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert scaler.stats()["skipped_steps"] == 2
