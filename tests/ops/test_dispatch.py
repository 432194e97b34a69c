"""Backend choice: what is listed is usable, what is asked for and unusable raises."""
import os

import pytest
import torch

import amp_engine
from amp_engine import ops
from amp_engine.ops import dispatch


def test_cpu_lists_reference_and_interpreted_triton():
    names = ops.available_backends("cpu")
    assert "reference" in names
    assert ("triton" in names) == (dispatch.unavailable_reason("triton", "cpu") is None)
    if amp_engine.build_info()["cpu_kernels"]:
        assert names[0] == "cpp"


def test_unknown_backend_raises():
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.unscale_and_check_([torch.ones(2)], torch.tensor(1.0), torch.zeros(()), backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_backend_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        ops.grad_norm_and_check([torch.ones(2)], torch.tensor(1.0), torch.zeros(()), backend="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("AMP_ENGINE_BACKEND", "reference")
    assert dispatch.select(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("AMP_ENGINE_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="AMP_ENGINE_BACKEND"):
            dispatch.select(None, torch.device("cpu"))


def test_default_is_first_available():
    if os.environ.get("AMP_ENGINE_BACKEND"):
        pytest.skip("default overridden")
    assert dispatch.select(None, torch.device("cpu")) == ops.available_backends("cpu")[0]
