"""Build amp_engine and its op library `amp_engine._C`.

The library uses only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly)
and Python's limited API, compiled for TORCH_TARGET (2.11): one build, made
against any torch from 2.11 on (pip's isolated build uses the newest allowed),
loads and runs on every torch from 2.11 to the newest allowed.

The C++ CPU kernels are always built. The CUDA kernels are built when torch has
CUDA and a CUDA toolkit is found, never by asking for a GPU (build machines have
none). Environment:

  AMP_ENGINE_CUDA=auto|0|1   auto (default): build CUDA kernels when possible;
                             0: skip them; 1: require them (fail if impossible).
  TORCH_CUDA_ARCH_LIST       CUDA targets; default "9.0+PTX" (Hopper + PTX).
  AMP_ENGINE_NATIVE=1|0      1 (default): tune the CPU kernels for the building
                             machine (-march=native); 0: portable x86-64 build.
  CUDA_HOME                  the toolkit root (holding include/cuda_runtime.h).
  MAX_JOBS                   parallel compile jobs (ninja).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The real toolkit root. torch guesses the parent of `which nvcc`, which is
    wrong when nvcc is a wrapper script (as in /usr/local/bin here)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


_cuda_mode = os.environ.get("AMP_ENGINE_CUDA", "auto").strip().lower()
if _cuda_mode not in ("auto", "0", "1"):
    raise SystemExit(f"AMP_ENGINE_CUDA={_cuda_mode!r}: allowed values are auto, 0, 1")
_cuda_home = _find_cuda_home()
if _cuda_home and _cuda_mode != "0":
    os.environ["CUDA_HOME"] = _cuda_home  # before cpp_extension reads it
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")  # no GPU to ask on build machines

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = _cuda_mode != "0" and torch.version.cuda is not None and _cuda_home is not None
if _cuda_mode == "1" and not with_cuda:
    raise SystemExit(
        "AMP_ENGINE_CUDA=1 but CUDA kernels cannot be built: "
        f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit found at {_cuda_home!r}"
    )
native = os.environ.get("AMP_ENGINE_NATIVE", "1") != "0"

# The oldest torch the library must load on: the stable-ABI headers then offer
# only what that version's libtorch exports (TORCH_FEATURE_VERSION gates them).
TORCH_TARGET = "2.11"
_target_hex = "0x%02x%02x000000000000" % tuple(int(x) for x in TORCH_TARGET.split("."))

sources = ["csrc/ops.cpp", "csrc/errors.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# torch adds its own -std (C++17 for 2.11, C++20 for 2.14).
# -fno-math-errno: nothing reads errno, and with it GCC vectorizes sqrt (optimizer steps).
# -ffp-contract=off: no fused multiply-adds, which would break bitwise equality
#   with the Python reference (csrc/math/hd.h); a flag, not a GCC-only pragma.
# -fopenmp-simd: the `omp simd` hints only; threads come from torch's own
#   parallel_for through the stable ABI, so no OpenMP runtime is linked here.
# -fvisibility=hidden: the library exports PyInit__C only (its C++ types hold
#   torch's hidden-visibility stable types, and nothing else should bind to them).
cxx_flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off", "-fvisibility=hidden"]
cxx_flags += ["-march=native"] if native else []
link_flags = []
# --fmad=false: the same no-FMA rule for the GPU, so CUDA runs exactly the
# arithmetic the CPU tests verify bitwise (csrc/math/). Division and sqrt stay
# IEEE-exact (nvcc's defaults, stated for the reader). The cost is nil for these
# memory-bound kernels.
nvcc_flags = ["-O3", "--threads", "1", "-lineinfo", "--fmad=false", "-prec-div=true",
              "-prec-sqrt=true", "-ftz=false", "-Xcompiler", "-fvisibility=hidden"]
# torch defines Py_LIMITED_API itself for py_limited_api builds
define_macros = [("TORCH_TARGET_VERSION", _target_hex)]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # USE_CUDA: the stable shim's CUDA entries (current stream) are declared under it
    define_macros += [("AMP_ENGINE_WITH_CUDA", "1"), ("USE_CUDA", "1")]
    Extension = CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    Extension = CppExtension
    extra = {"cxx": cxx_flags}

# Build facts, read back by amp_engine.build_info().
with open(os.path.join(HERE, "amp_engine", "_build_config.py"), "w") as f:
    f.write(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_TARGET = {TORCH_TARGET!r}  # stable ABI: loads on torch >= this\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else None!r}\n"
        f"CUDA_HOME = {_cuda_home if with_cuda else None!r}\n"
        f"CPU_NATIVE = {native!r}\n"
        f"CXX_FLAGS = {cxx_flags!r}\n"
    )

setup(
    packages=find_packages(include=["amp_engine", "amp_engine.*"]),
    ext_modules=[
        Extension(
            "amp_engine._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra,
            extra_link_args=link_flags,
            define_macros=define_macros,
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
