"""torch.library.opcheck on every compiled op: schema, fake kernel, autograd registration."""
import pytest
import torch

import amp_engine
from conftest import HAS_CUDA

DEVICES = [d for d, key in (("cpu", "cpu_kernels"), ("cuda", "cuda_kernels"))
           if amp_engine.build_info()[key] and (d == "cpu" or HAS_CUDA)]
pytestmark = [
    pytest.mark.skipif(not DEVICES, reason="compiled kernels not built"),
    pytest.mark.parametrize("device", DEVICES or ["cpu"]),
]


def grads(device):
    out = [torch.randn(n, device=device).to(d) for n, d in
           [(100, torch.float32), (7, torch.float16), (33, torch.bfloat16), (5, torch.float64)]]
    out[1][3] = float("inf")
    return out


def test_unscale_and_check(device):
    args = (grads(device), torch.tensor(0.5, device=device), torch.zeros((), device=device),
            torch.zeros(4, dtype=torch.int64, device=device))
    torch.library.opcheck(torch.ops.amp_engine.unscale_and_check_.default, args)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_grad_norm_and_check(device, per_tensor):
    args = (grads(device), torch.tensor(0.5, device=device), torch.zeros((), device=device),
            torch.zeros(4, dtype=torch.int64, device=device), per_tensor)
    torch.library.opcheck(torch.ops.amp_engine.grad_norm_and_check.default, args)


def test_update_scale(device):
    args = (torch.tensor(1024.0, device=device), torch.zeros((), dtype=torch.int32, device=device),
            torch.ones((), dtype=torch.int32, device=device), torch.ones((), device=device),
            2.0, 0.5, 100, 1, 2.0**-24, float("inf"))
    torch.library.opcheck(torch.ops.amp_engine.update_scale_.default, args)


def test_grad_norm_and_check_with_clip_outputs(device):
    args = (grads(device), torch.tensor(0.5, device=device), torch.zeros((), device=device),
            torch.zeros(4, dtype=torch.int64, device=device), False, 1.0,
            torch.zeros((), device=device), torch.zeros((), device=device))
    torch.library.opcheck(torch.ops.amp_engine.grad_norm_and_check.default, args)


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_update_scale_with_bookkeeping(device, found):
    i64 = dict(dtype=torch.int64, device=device)
    args = (torch.tensor(1024.0, device=device), torch.zeros((), dtype=torch.int32, device=device),
            torch.ones((), dtype=torch.int32, device=device), torch.full((), found, device=device),
            2.0, 0.5, 100, 1, 2.0**-24, float("inf"), torch.zeros((), device=device),
            torch.ones((), device=device), torch.tensor([5, 2, 4], **i64),
            torch.arange(6, **i64), torch.zeros(3, 7, **i64))
    torch.library.opcheck(torch.ops.amp_engine.update_scale_.default, args)
