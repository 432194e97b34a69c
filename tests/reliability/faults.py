"""Fault-injection harness: faults, the documented scale rule, bitwise snapshots and
a reference run that simply drops the faulty steps.

Faults are written while the backward runs (a post-accumulate-grad hook), so
the same injector drives the bare scaler+optimizer loop and the trainer, whose
backward happens inside ``train_step``.
"""
from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass

import torch
from torch import nn

INF, NAN = float("inf"), float("nan")
KINDS = ("grad", "loss", "after_unscale")


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class ScaleRule:
    """The documented update rule (ops.update_scale_'s docstring), in plain Python.

    Overflow: the growth tracker resets, the hysteresis tracker drops by one and
    once it is <= 0 the scale backs off to ``max(fp32(scale * backoff), min_scale)``.
    Clean: the hysteresis tracker refills; after ``growth_interval`` clean steps the
    scale grows to ``min(fp32(scale * growth), max_scale)`` when that is finite.
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, hysteresis=1, min_scale=2.0**-24, max_scale=INF):
        self.scale, self.growth, self.backoff = f32(init_scale), growth_factor, backoff_factor
        self.interval, self.hysteresis = growth_interval, hysteresis
        self.lo, self.hi = min_scale, max_scale
        self.tracker, self.hyst = 0, hysteresis

    def update(self, overflow: bool) -> None:
        if overflow:
            self.tracker = 0
            self.hyst = max(self.hyst - 1, 0)
            if self.hyst == 0:
                self.scale = max(f32(self.scale * self.backoff), self.lo)
            return
        self.hyst = self.hysteresis
        self.tracker += 1
        if self.tracker >= self.interval:
            grown = f32(self.scale * self.growth)
            if math.isfinite(grown):
                self.scale = min(grown, self.hi)
            self.tracker = 0


@dataclass
class Fault:
    kind: str  # one of KINDS
    micro: int  # the micro-batch of the accumulation window it hits
    param: int = 0  # index into the model's params (grad faults)
    positions: tuple = ()  # flat positions in that grad
    values: tuple = ()


class Injector:
    """Writes an armed fault into a grad during the backward, or into the loss."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.armed: Fault | None = None
        self.fired = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def arm(self, fault: Fault | None) -> None:
        self.armed = fault

    def _hook(self, p: torch.Tensor) -> None:
        fault = self.armed
        if fault is None or fault.kind == "loss" or p is not self.params[fault.param]:
            return
        flat = p.grad.view(-1)
        for pos, value in zip(fault.positions, fault.values):
            flat[pos % flat.numel()] = value
        self.armed, self.fired = None, self.fired + 1

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        fault = self.armed
        if fault is None or fault.kind != "loss":
            return loss
        self.armed, self.fired = None, self.fired + 1
        return loss * fault.values[0]


class FaultPlan:
    """Seeded random faults: ``rate`` of the steps, plus forced runs of consecutive ones."""

    def __init__(self, seed: int, rate: float, accumulate: int, n_params: int,
                 forced: range = range(0), kinds=KINDS) -> None:
        self.rng = random.Random(seed)
        self.rate, self.accumulate, self.n_params = rate, accumulate, n_params
        self.forced, self.kinds = forced, kinds

    def fault(self, step: int, scale: float, grad_dtypes) -> Fault | None:
        rng = self.rng
        if step not in self.forced and rng.random() >= self.rate:
            return None
        kinds = [k for k in self.kinds if k != "after_unscale" or scale < 1.0]
        kind = rng.choice(kinds)
        micro = rng.randrange(self.accumulate)
        if kind == "loss":
            return Fault("loss", micro, values=(rng.choice((INF, -INF, NAN)),))
        param = rng.randrange(self.n_params)
        n = rng.randint(1, 3)
        positions = tuple(rng.randrange(1 << 20) for _ in range(n))
        if kind == "grad":
            values = tuple(rng.choice((INF, -INF, NAN)) for _ in range(n))
        else:  # finite, but inf once multiplied by inv_scale >= 2 (in the grad's dtype)
            big = torch.finfo(grad_dtypes[param]).max * 0.75
            values = tuple(rng.choice((big, -big)) for _ in range(n))
        return Fault(kind, micro, param, positions, values)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (NaN payloads and -0.0 included)."""
    t = t.detach().clone()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer's state (masters, moments, steps) and groups (rng_state)."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"{gi}.{pi}.{key}"] = v
        if isinstance(group.get("rng_state"), torch.Tensor):
            out[f"{gi}.rng_state"] = group["rng_state"]
    return out


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    snap = {f"param.{i}": bits(p) for i, p in enumerate(model.parameters())}
    snap.update((k, bits(v)) for k, v in optimizer_tensors(opt).items())
    return snap


def assert_same_bits(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: state keys {sorted(a)} != {sorted(b)}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def mlp(dtype: torch.dtype, seed: int) -> nn.Module:
    """2-layer MLP, 212 params."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batch(step: int, micro: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 17 + micro)
    x = torch.randn(16, 8, generator=g)
    return x, (x[:, :4] * 0.5 + torch.randn(16, 4, generator=g) * 0.1).tanh()


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.float() - y.float()) ** 2).mean()
