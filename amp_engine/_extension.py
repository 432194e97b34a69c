"""Loads the compiled op library `amp_engine._C` and says what was built.

The library is built on the LibTorch stable ABI for a target torch (2.11): one
build loads on every torch from the target on. Import never breaks: if the
library is missing or fails to load, amp_engine warns once with the cause and
the command that fixes it, and the op layer falls back to Triton (CUDA tensors)
or the plain torch reference.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

try:
    from amp_engine import _build_config as _cfg
except ImportError:  # source checkout that was never built
    _cfg = None

LOADED: bool = False
LOAD_ERROR: str | None = None

#: Rebuilds the library against the torch of the running interpreter.
REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _load_failure_advice(exc: BaseException) -> str:
    """The cause of a failed load in words, and the command that fixes it."""
    target = getattr(_cfg, "TORCH_TARGET", None)
    if isinstance(exc, ModuleNotFoundError) and importlib.util.find_spec("amp_engine._C") is None:
        return (
            "this installation has no compiled library (a source checkout that was never "
            f"built, or a wheel without it). Build it: `{REBUILD_COMMAND}` (or, in a source "
            "checkout, `python setup.py build_ext --inplace`)"
        )
    if target is not None and _version_tuple(torch.__version__) < _version_tuple(target):
        return (
            f"it was built for torch >= {target} (stable ABI) but this is torch "
            f"{torch.__version__}; install torch >= {target}, or rebuild for this torch: "
            f"`{REBUILD_COMMAND}`"
        )
    if target is None:
        return (
            "it was built without the stable-ABI target (an older amp_engine build against "
            "another torch's ATen ABI); rebuild it against this torch: "
            f"`{REBUILD_COMMAND}`"
        )
    return (
        f"the library (stable ABI, torch >= {target}, built with torch "
        f"{getattr(_cfg, 'TORCH_VERSION', '?')}) does not load here; rebuild it against this "
        f"torch: `{REBUILD_COMMAND}`, and report the error if it persists"
    )


try:
    importlib.import_module("amp_engine._C")  # runs the STABLE_TORCH_LIBRARY registrations
    LOADED = True
except Exception as exc:  # noqa: BLE001 - any load failure means "fall back"
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"amp_engine: compiled kernels not loaded: {_load_failure_advice(exc)}. "
        f"Falling back to Triton / plain-torch kernels. ({LOAD_ERROR})",
        RuntimeWarning,
        stacklevel=2,
    )


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
        # the oldest torch the library loads on (LibTorch stable ABI target)
        "torch_abi_target": getattr(_cfg, "TORCH_TARGET", None),
        "cuda_compiled": getattr(_cfg, "CUDA_VERSION", None),
        "cuda_arch_list": getattr(_cfg, "CUDA_ARCH_LIST", None),
        "cpu_native": getattr(_cfg, "CPU_NATIVE", None),
        "cpu_kernels": has_kernels("CPU"),
        "cuda_kernels": has_kernels("CUDA"),
    }
    if _cfg is not None and not _cfg.WITH_CUDA:
        info["cuda_kernels_reason"] = "built without CUDA (no CUDA torch or toolkit, or AMP_ENGINE_CUDA=0)"
    return info
