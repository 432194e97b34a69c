"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is imported (it is read when
@triton.jit decorates), so the Triton kernels can run on CPU tensors here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import amp_engine  # noqa: E402,F401
from amp_engine.ops import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda") if HAS_CUDA else []
# (backend, device) pairs every op test runs over; CUDA ones only with a GPU.
BACKEND_DEVICES = [(b, "cpu") for b in CPU_BACKENDS] + [(b, "cuda") for b in CUDA_BACKENDS]


def backend_params():
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in BACKEND_DEVICES]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
