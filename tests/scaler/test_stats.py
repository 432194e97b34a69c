"""Overflow statistics and attribution, read lazily; no host sync on the fused path."""
import contextlib
import json
import math
import os
import sys

import pytest
import torch

from amp_engine.scaler import GradScaler
from .cases import ContractSGD, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def _train(scaler, model, opt, steps, plan, x=None):
    """plan: {step: [(param, n_bad)]} sets n_bad grad elements of param to inf."""
    x = torch.randn(5, 4) if x is None else x
    for i in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        for p, n_bad in plan.get(i, []):
            p.grad.view(-1)[:n_bad] = math.inf
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("opt_name", ["contract", "sgd", "adamw-fused"])
def test_overflow_report_names_counts_and_steps(opt_name):
    model = Net()
    params = dict(model.named_parameters())
    opt = {"contract": lambda: ContractSGD(model.parameters(), lr=0.01),
           "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.01),
           "adamw-fused": lambda: torch.optim.AdamW(model.parameters(), fused=True)}[opt_name]()
    s = GradScaler("cpu", init_scale=2.0**10)
    plan = {3: [(params["head.weight"], 2)], 10: [(params["head.weight"], 1),
                                                  (params["embed.bias"], 4)],
            11: [(params["head.weight"], 3)]}
    _train(s, model, opt, 15, plan)
    report = s.overflow_report(model.named_parameters())
    assert report == [{"name": "head.weight", "count": 6, "steps": [3, 10, 11]},
                      {"name": "embed.bias", "count": 4, "steps": [10]}]
    json.dumps(report)
    assert s.overflow_report(model, top_k=1) == report[:1]
    st = s.stats()
    assert st["steps"] == 15 and st["skipped_steps"] == 3
    json.dumps(st)


def test_names_registered_once_and_fallback_names():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    s = GradScaler("cpu")
    _train(s, model, opt, 3, {1: [(model.head.bias, 1)]})
    assert s.overflow_report() == [
        {"name": "SGD#0.param_groups[0][3]", "count": 1, "steps": [1]}]
    s.register_parameter_names(model)
    assert s.overflow_report()[0]["name"] == "head.bias"


def test_history_keeps_the_last_overflow_steps_and_exact_counts():
    model = Net()
    opt = ContractSGD(model.parameters(), lr=0.01)
    s = GradScaler("cpu", overflow_history=2, growth_interval=1)
    plan = {i: [(model.embed.weight, 1)] for i in (1, 4, 6, 9, 10)}
    _train(s, model, opt, 12, plan)
    assert s.overflow_report(model) == [{"name": "embed.weight", "count": 5, "steps": [9, 10]}]


def test_clip_path_and_missing_grads_are_attributed():
    model = Net()
    frozen_first = [model.embed.weight, model.head.weight, model.embed.bias, model.head.bias]
    opt = torch.optim.AdamW(frozen_first, fused=True)  # params out of module order
    s = GradScaler("cpu")
    model.embed.weight.requires_grad_(False)  # its grad stays None: the index path
    x = torch.randn(5, 4)
    for i in range(4):
        opt.zero_grad()
        s.scale(model(x).pow(2).mean()).backward()
        if i == 2:
            model.head.bias.grad[1] = math.nan
        s.clip_grad_norm_(opt, 1.0)
        s.step(opt)
        s.update()
    assert s.overflow_report(model) == [{"name": "head.bias", "count": 1, "steps": [2]}]


def test_two_optimizers_and_new_param_groups():
    model = Net()
    o1 = torch.optim.SGD(model.embed.parameters(), lr=0.01)
    o2 = ContractSGD([model.head.weight], lr=0.01)
    s = GradScaler("cpu")
    x = torch.randn(5, 4)
    for i in range(6):
        for o in (o1, o2):
            o.zero_grad()
        s.scale(model(x).pow(2).mean()).backward()
        if i == 1:
            model.embed.bias.grad[0] = math.inf
        if i == 4:
            model.head.bias.grad[0] = math.inf
            model.head.weight.grad[0, :2] = math.inf
        s.step(o1)
        s.step(o2)
        s.update()
        if i == 2:
            o2.add_param_group({"params": [model.head.bias]})  # the cache follows
    assert s.overflow_report(model) == [
        {"name": "head.weight", "count": 2, "steps": [4]},
        {"name": "embed.bias", "count": 1, "steps": [1]},
        {"name": "head.bias", "count": 1, "steps": [4]}]
    assert s.stats()["skipped_steps"] == 2


def test_track_overflow_off():
    model = Net()
    s = GradScaler("cpu", track_overflow=False)
    _train(s, model, torch.optim.SGD(model.parameters(), lr=0.01), 3, {1: [(model.head.bias, 1)]})
    assert s.overflow_report(model) == [] and s.stats()["skipped_steps"] == 1


@contextlib.contextmanager
def count_syncs():
    """Count the Tensor methods that copy a value to the host (a sync on CUDA)."""
    calls = []
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name, fn):
        def counted(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            # the Triton launcher turns Python floats into fp32 through a host tensor
            # (torch.tensor(x).item()): host-only, not a device sync
            # AmpStats makes a numpy view of its host-memory floor counter once: no copy
            host_view = name == "numpy" and caller.endswith(os.path.join("scaler", "stats.py"))
            if not caller.endswith(os.path.join("ops", "triton", "scaling.py")) and not host_view:
                calls.append(name)
            return fn(self, *a, **k)
        return counted

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("opt_name", ["contract", "adamw-fused", "sgd-fused"])
@pytest.mark.parametrize("clip", [False, True])
def test_no_host_sync_on_the_fused_path(opt_name, clip):
    model = Net()
    opt = {"contract": lambda: ContractSGD(model.parameters(), lr=0.01),
           "adamw-fused": lambda: torch.optim.AdamW(model.parameters(), fused=True),
           "sgd-fused": lambda: torch.optim.SGD(model.parameters(), lr=0.01, fused=True)}[opt_name]()
    s = GradScaler("cpu", growth_interval=2, floor_patience=4)
    x = torch.randn(5, 4)
    with count_syncs() as calls:
        for i in range(8):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            scaled = s.scale(loss)
            scaled.backward()
            if i in (2, 5):
                model.head.weight.grad[0, 0] = math.inf
            if clip:
                s.clip_grad_norm_(opt, 0.1)
            s.step(opt)
            s.update()
    assert calls == []
    assert s.stats()["skipped_steps"] == 2  # and the skips were real
    # the reference: the non-fused path syncs exactly once per step
    with count_syncs() as calls:
        opt2 = torch.optim.SGD(model.parameters(), lr=0.01)
        s.scale(model(x).sum()).backward()
        s.step(opt2)
        s.update()
    assert calls == ["item"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("clip", [False, True])
def test_no_cuda_sync_on_the_fused_path(clip):
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    s = GradScaler("cuda", growth_interval=2, floor_patience=4)
    x = torch.randn(5, 4, device="cuda")
    for i in range(10):  # the first steps allocate: warm up before checking
        if i >= 3:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.zero_grad()
            s.scale(model(x).pow(2).mean()).backward()
            if i == 5:
                model.head.weight.grad[0, 0] = math.inf
            if clip:
                s.clip_grad_norm_(opt, 0.1)
            s.step(opt)
            s.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert s.stats()["skipped_steps"] == 1
