"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is imported (it is read when
@triton.jit decorates), so the Triton kernels can run on CPU tensors here. The
interpreter computes in numpy: without numpy (an optional package) triton would not
even import under it, so it stays off and the Triton tests skip with that reason.
"""
import importlib.util
import os

if importlib.util.find_spec("numpy") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import amp_engine  # noqa: E402,F401
from amp_engine.ops import available_backends, dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
#: every backend that runs CUDA tensors: their CUDA variants are always generated
#: (skipped where they cannot run), so a CPU run reports the CUDA coverage it lacks
CUDA_ORDER = ("cuda", "triton", "reference")
NO_CUDA = "needs a CUDA device"
CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda") if HAS_CUDA else []
# (backend, device) pairs every op test runs over: the CPU ones usable here, every CUDA one.
BACKEND_DEVICES = [(b, "cpu") for b in CPU_BACKENDS] + [(b, "cuda") for b in CUDA_ORDER]


def device_param(backend: str, device: str, reason_of=dispatch.unavailable_reason):
    """pytest.param(backend, device); a CUDA one is marked `cuda` and skipped, with the
    reason, where it cannot run ("needs a CUDA device" on a machine without one)."""
    if device != "cuda":
        return pytest.param(backend, device, id=f"{backend}-{device}")
    reason = NO_CUDA if not HAS_CUDA else reason_of(backend, device)
    marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=f"{backend}-cuda: {reason}")] if reason else [])
    return pytest.param(backend, device, id=f"{backend}-{device}", marks=marks)


def backend_params():
    return [device_param(b, d) for b, d in BACKEND_DEVICES]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
