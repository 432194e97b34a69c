"""Shared pieces of the GradScaler tests: models, runs side by side with torch, a
test-only optimizer that implements amp_engine's fused-optimizer contract."""
from __future__ import annotations

import random

import pytest
import torch

import amp_engine.scaler as ours


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: torch's CPU kernels on tiny tensors spend far longer
    waking a thread pool than computing, worse on busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ContractSGD(torch.optim.Optimizer):
    """Plain SGD that implements amp_engine's hand-off contract with plain torch ops.

    The scaler passes ``amp_inputs=(grad_scale, found_inf, clip_coef)`` to step()
    (0-dim fp32 or None; found_inf never None; torch's protocol, attributes of these
    names, is read without it); the step
    multiplies grads by clip_coef / grad_scale in fp32 and skips on the device
    when found_inf != 0 (no host sync). Without clipping the arithmetic is
    torch's unscale (g * fp32(1 / fp64(scale))) followed by torch's SGD update,
    so trajectories match torch's bitwise. ``seen`` records what it was given.
    """

    _step_supports_amp_scaling = True
    _amp_engine_fused = True

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None, *, amp_inputs=None):
        if amp_inputs is None:
            amp_inputs = tuple(getattr(self, n, None) for n in ("grad_scale", "found_inf", "clip_coef"))
        grad_scale, found_inf, clip_coef = amp_inputs
        self.seen.append((grad_scale, found_inf, clip_coef))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                if grad_scale is not None:
                    g = g * grad_scale.double().reciprocal().float()
                g = g.to(p.grad.dtype)
                if clip_coef is not None:
                    g = g * clip_coef.to(g.dtype)
                new = p.add(g, alpha=-group["lr"])
                if found_inf is not None:
                    new = torch.where(found_inf != 0, p, new)
                p.copy_(new)
        return "stepped"


def make_model(dtype=torch.float32, seed=0, widths=(8, 16, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [torch.nn.Linear(widths[i], widths[i + 1]), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def batches(n, dtype=torch.float32, seed=1, width_in=8, width_out=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, width_in, generator=g).to(dtype),
             torch.randn(16, width_out, generator=g).to(dtype)) for _ in range(n)]


def inf_plan(steps, rate=0.1, seed=2, first=2):
    """{step: (param index, flat position, value)} of injected non-finite grads."""
    rng = random.Random(seed)
    values = (float("inf"), float("-inf"), float("nan"))
    return {s: (rng.randrange(1 << 30), rng.randrange(1 << 30), rng.choice(values))
            for s in range(first, steps) if rng.random() < rate}


def inject(params, spec):
    pi, pos, val = spec
    with_grad = [p for p in params if p.grad is not None]
    p = with_grad[pi % len(with_grad)]
    p.grad.view(-1)[pos % p.grad.numel()] = val


def found_inf_value(scaler, optimizer) -> float:
    return float(sum(v.item() for v in scaler._found_inf_per_device(optimizer).values()))


def trajectory(scaler_cls, opt_factories, *, steps=300, dtype=torch.float32, accumulate=1,
               scaler_kwargs=None, plan=None, clip=None, enabled=True):
    """Train a small model; return scales, skip flags and final params.

    ``opt_factories``: functions params -> optimizer; with two, the first layer
    goes to the first optimizer and the rest to the second (one shared scaler).
    ``clip``: max_norm, applied with torch's recipe for torch's scaler and with
    ``clip_grad_norm_`` for ours.
    """
    model = make_model(dtype)
    params = list(model.parameters())
    if len(opt_factories) == 1:
        opts = [opt_factories[0](params)]
    else:
        opts = [opt_factories[0](params[:2]), opt_factories[1](params[2:])]
    kwargs = dict(init_scale=2.0**10, growth_interval=7, enabled=enabled)
    kwargs.update(scaler_kwargs or {})
    scaler = scaler_cls("cpu", **kwargs)
    plan = inf_plan(steps) if plan is None else plan
    data = batches(steps * accumulate, dtype)
    scales, skips = [], []
    for step in range(steps):
        for opt in opts:
            opt.zero_grad()
        for micro in range(accumulate):
            x, y = data[step * accumulate + micro]
            loss = ((model(x) - y) ** 2).mean() / accumulate
            scaler.scale(loss).backward()
        if step in plan:
            inject(params, plan[step])
        for opt in opts:
            if clip is not None:
                if isinstance(scaler, ours.GradScaler):
                    scaler.clip_grad_norm_(opt, clip)
                else:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], clip)
            scaler.step(opt)
        if enabled:
            skips.append(tuple(found_inf_value(scaler, o) for o in opts))
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, skips, [p.detach().clone() for p in params]


def assert_same_trajectory(a, b, exact=True, rtol=1e-5, atol=1e-6):
    scales_a, skips_a, params_a = a
    scales_b, skips_b, params_b = b
    assert skips_a == skips_b
    assert scales_a == scales_b
    for pa, pb in zip(params_a, params_b):
        assert pa.dtype == pb.dtype
        if exact:
            assert torch.equal(pa, pb), (pa - pb).abs().max()
        else:
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)
