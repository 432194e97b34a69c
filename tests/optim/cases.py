"""Inputs shared by the optimizer tests: op argument lists and the backends to run."""
from __future__ import annotations

import pytest
import torch

from amp_engine.ops import optim_backends, optim_steps
from conftest import CUDA_ORDER, device_param

# the CPU backends usable here and every CUDA one (skipped where it cannot run)
ALL = [(b, "cpu") for b in optim_backends("cpu")] + [(b, "cuda") for b in CUDA_ORDER]
# every backend but the reference (which the others are compared against)
KERNELS = [(b, d) for b, d in ALL if b != "reference"]
SIZES = [0, 1, 5, 123, 4097, 65539]
LOW = (torch.float16, torch.bfloat16)


def backend_params(pairs=None):
    pairs = ALL if pairs is None else pairs
    return [device_param(b, d, optim_steps.unavailable_reason) for b, d in pairs]


def sizes_for(backend: str) -> list[int]:
    # the Triton interpreter runs ~1.4 s per million elements on a CPU
    return [s for s in SIZES if s <= 4097] if backend == "triton" else SIZES


def adam_lists(dtypes, sizes, device, *, master=False, amsgrad=False, seed=0, grad_dtypes=None):
    """Positional op lists (params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
    steps) with state as after a few steps: non-zero moments, steps 0..2."""
    gen = torch.Generator().manual_seed(seed)
    out = [[] for _ in range(7)]
    for i, (dt, n) in enumerate(zip(dtypes, sizes)):
        acc = torch.float64 if dt == torch.float64 else torch.float32
        w = torch.randn(n, generator=gen, dtype=torch.float64)
        gdt = grad_dtypes[i] if grad_dtypes else dt
        out[0].append(w.to(dt).to(device))
        out[1].append((torch.randn(n, generator=gen, dtype=torch.float64) * 64).to(gdt).to(device))
        if master:
            out[2].append((w + torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).float().to(device))
        out[3].append((torch.randn(n, generator=gen, dtype=torch.float64) * 1e-2).to(acc).to(device))
        out[4].append((torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3).to(acc).to(device))
        if amsgrad:
            out[5].append((torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3).to(acc).to(device))
        out[6].append(torch.tensor(float(i % 3), device=device))
    return out


def sgd_lists(dtypes, sizes, device, *, master=False, momentum=True, seed=0):
    """(params, grads, masters, momentum_buffers, steps)."""
    p, g, m, ea, _, _, s = adam_lists(dtypes, sizes, device, master=master, seed=seed)
    return [p, g, m, ea if momentum else [], s]


def clone_lists(lists):
    return [[t.clone() for t in ts] for ts in lists]


def assert_lists_equal(a, b, *, rtol=0.0, atol=0.0, what=""):
    for k, (xs, ys) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if x.dtype == torch.float64 and (rtol or atol) == 0:
                torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-300, equal_nan=True,
                                           msg=lambda m: f"{what} list {k} tensor {i}: {m}")
            else:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True,
                                           msg=lambda m: f"{what} list {k} tensor {i}: {m}")


def scalar(v, device, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype, device=device)
