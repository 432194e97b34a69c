"""Loads the compiled op library `amp_engine._C` and says what was built.

Import never breaks: if the library is missing or fails to load (a CPU-only
checkout, an ABI mismatch with the installed torch), amp_engine warns once with
the reason and the op layer falls back to Triton (CUDA tensors) or the plain
torch reference.
"""
from __future__ import annotations

import importlib
import warnings

import torch

LOADED: bool = False
LOAD_ERROR: str | None = None

try:
    importlib.import_module("amp_engine._C")  # runs TORCH_LIBRARY registrations
    LOADED = True
except Exception as exc:  # noqa: BLE001 - any load failure means "fall back"
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"amp_engine: compiled kernels not loaded ({LOAD_ERROR}); falling back to "
        "Triton / plain-torch kernels. Reinstall with `pip install .` to build them.",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    from amp_engine import _build_config as _cfg
except ImportError:  # source checkout that was never built
    _cfg = None


@torch.compiler.assume_constant_result  # torch.compile: a fact of the build, not a graph break
def has_kernels(dispatch_key: str, op: str = "unscale_and_check_") -> bool:
    """Whether the loaded library registered a `dispatch_key` ("CPU" or "CUDA") kernel for `op`."""
    if not LOADED or not hasattr(torch.ops.amp_engine, op):
        return False
    dump = torch._C._dispatch_dump(f"amp_engine::{op}")
    return f"\n{dispatch_key}:" in dump or dump.startswith(f"{dispatch_key}:")


def build_info() -> dict:
    """Facts about this build: versions compiled against, CUDA archs, which
    compiled kernels are registered, and why something is missing."""
    info = {
        "extension_loaded": LOADED,
        "load_error": LOAD_ERROR,
        "torch_runtime": torch.__version__,
        "torch_compiled": getattr(_cfg, "TORCH_VERSION", None),
        "cuda_compiled": getattr(_cfg, "CUDA_VERSION", None),
        "cuda_arch_list": getattr(_cfg, "CUDA_ARCH_LIST", None),
        "cpu_native": getattr(_cfg, "CPU_NATIVE", None),
        "cpu_kernels": has_kernels("CPU"),
        "cuda_kernels": has_kernels("CUDA"),
    }
    if _cfg is not None and not _cfg.WITH_CUDA:
        info["cuda_kernels_reason"] = "built without CUDA (no CUDA torch or toolkit, or AMP_ENGINE_CUDA=0)"
    return info
