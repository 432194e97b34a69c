"""What was built is what we claim (CI sets AMP_ENGINE_REQUIRE_KERNELS=1)."""
import os

import pytest

import amp_engine
from amp_engine.ops import available_backends


def test_build_info_keys():
    info = amp_engine.build_info()
    for key in ("extension_loaded", "load_error", "torch_runtime", "cpu_kernels", "cuda_kernels"):
        assert key in info
    assert info["extension_loaded"] == (info["load_error"] is None)


def test_reference_always_available():
    assert "reference" in available_backends("cpu")


@pytest.mark.skipif(os.environ.get("AMP_ENGINE_REQUIRE_KERNELS") != "1", reason="dev run")
def test_compiled_kernels_present():
    info = amp_engine.build_info()
    assert info["extension_loaded"], info["load_error"]
    assert info["cpu_kernels"]
    assert available_backends("cpu")[0] == "cpp"
