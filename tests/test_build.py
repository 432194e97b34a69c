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


# ---------------------------------------------------------------- stable ABI
# The library is built on the LibTorch stable ABI for torch >= 2.11 (setup.py
# TORCH_TARGET): one build loads on every torch from 2.11 on.
import glob  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from amp_engine import _extension  # noqa: E402

needs_library = pytest.mark.skipif(not _extension.LOADED, reason="compiled library not loaded")


def _library_path() -> str:
    here = os.path.dirname(amp_engine.__file__)
    paths = glob.glob(os.path.join(here, "_C*.so"))
    if not paths:
        pytest.skip("no _C*.so next to the package")
    return paths[0]


@needs_library
def test_build_info_reports_abi_target():
    info = amp_engine.build_info()
    assert info["torch_abi_target"] == "2.11"
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= (2, 11)


# Symbols the library may need from outside: torch's stable C shim, Python's
# limited API, the C/C++ runtimes, the CUDA runtime. Any C++ symbol of ATen or
# c10 (namespaces at::, c10::, torch::) would tie the build to one torch.
_C_PREFIXES = ("aoti_torch_", "torch_", "Py", "_Py", "cuda", "__cuda", "__cxa", "__gxx",
               "_Unwind", "__gmon", "_ITM")
_CXX_RUNTIME = ("std::", "typeinfo for std::", "vtable for std::", "VTT for std::",
                "operator new", "operator delete", "__cxxabiv1::", "typeinfo for __cxxabiv1::",
                "vtable for __cxxabiv1::")


@needs_library
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None,
                    reason="needs binutils' nm and c++filt")
def test_library_imports_only_the_stable_abi():
    out = subprocess.run(["nm", "-D", "--undefined-only", _library_path()], check=True,
                         capture_output=True, text=True).stdout
    symbols = [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]
    cxx = [s for s in symbols if s.startswith("_Z")]
    demangled = subprocess.run(["c++filt"], input="\n".join(cxx), check=True, capture_output=True,
                               text=True).stdout.splitlines()
    foreign = [d for d in demangled if not d.startswith(_CXX_RUNTIME)]
    foreign += [s for s in symbols if not s.startswith("_Z") and not s.startswith(_C_PREFIXES)
                and not s.islower()]  # plain C library functions (memcpy, ...)
    assert not foreign, f"symbols outside the stable ABI: {foreign[:10]}"
    assert any(s.startswith("aoti_torch_") for s in symbols)  # the test sees the shim at all


@needs_library
def test_library_exports_only_the_module_init():
    if shutil.which("nm") is None:
        pytest.skip("needs binutils' nm")
    out = subprocess.run(["nm", "-D", "--defined-only", _library_path()], check=True,
                         capture_output=True, text=True).stdout
    exported = [line.split()[-1] for line in out.splitlines() if " T " in line]
    assert exported == ["PyInit__C"], exported


@needs_library
@pytest.mark.skipif(not os.environ.get("AMP_ENGINE_OTHER_TORCH_PYTHON"),
                    reason="set AMP_ENGINE_OTHER_TORCH_PYTHON to an interpreter with another torch")
def test_same_library_loads_on_another_torch():
    """The very .so built here, loaded by another torch (e.g. 2.11 vs 2.14.1)."""
    code = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('amp_engine._C', sys.argv[1])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "g = [torch.tensor([2.0, float('inf')]), torch.tensor([4.0], dtype=torch.bfloat16)]\n"
        "f = torch.zeros(()); c = torch.zeros(2, dtype=torch.int64)\n"
        "torch.ops.amp_engine.unscale_and_check_(g, torch.tensor(0.5), f, c)\n"
        "assert g[0][0].item() == 1.0 and g[1].item() == 2.0, g\n"
        "assert f.item() == 1.0 and c.tolist() == [1, 0], (f, c)\n"
        "try:\n"
        "    torch.ops.amp_engine.unscale_and_check_([torch.ones(1, dtype=torch.int32)],\n"
        "                                            torch.tensor(1.0), f, None)\n"
        "except TypeError as e:\n"
        "    assert 'grads[0]' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no TypeError')\n"
        "print(torch.__version__)\n"
    )
    other = os.environ["AMP_ENGINE_OTHER_TORCH_PYTHON"]
    res = subprocess.run([other, "-c", code, _library_path()], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_load_failure_names_cause_and_fix(monkeypatch):
    class Cfg:
        TORCH_TARGET = "2.11"
        TORCH_VERSION = "2.14.1"

    monkeypatch.setattr(_extension, "_cfg", Cfg)
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    advice = _extension._load_failure_advice(OSError("undefined symbol: aoti_torch_x"))
    assert "torch >= 2.11" in advice and "2.10.0" in advice
    assert _extension.REBUILD_COMMAND in advice

    monkeypatch.setattr(torch, "__version__", "2.12.0")
    advice = _extension._load_failure_advice(OSError("undefined symbol: aoti_torch_x"))
    assert "rebuild" in advice and _extension.REBUILD_COMMAND in advice

    monkeypatch.setattr(_extension, "_cfg", None)
    advice = _extension._load_failure_advice(OSError("undefined symbol: _ZN3c10"))
    assert "ATen ABI" in advice and _extension.REBUILD_COMMAND in advice
