"""Backend choice for the op layer, and the fake kernels torch.compile traces.

Backends, fastest first on each device:
  CUDA tensors: "cuda" (compiled CUDA kernels) > "triton" > "reference"
  CPU tensors:  "cpp"  (compiled CPU kernels)  > "reference"
"triton" also runs CPU tensors when the Triton interpreter is on
(TRITON_INTERPRET=1, set before importing amp_engine); it is never the default
there, being a test vehicle. `AMP_ENGINE_BACKEND` overrides the default; a
backend asked for (by argument or variable) that is not usable raises.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from amp_engine import _extension
from amp_engine.ops import validation

BACKENDS = ("cuda", "triton", "cpp", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}

#: Every op of the layer and the modules of its Python backends (imported only
#: when that backend runs: the Triton ones import triton).
_SCALING = ("amp_engine.ops.reference.scaling", "amp_engine.ops.triton.scaling")
_OPTIM = ("amp_engine.ops.reference.optim", "amp_engine.ops.triton.optim")
_COMPACT = ("amp_engine.ops.reference.moments8", "amp_engine.ops.triton.moments8")
OPS = {"unscale_and_check_": _SCALING, "grad_norm_and_check": _SCALING, "update_scale_": _SCALING,
       "adam_step_": _OPTIM, "sgd_step_": _OPTIM, "adam_step_compact_": _COMPACT}
DEFAULT_OP = "unscale_and_check_"


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op={op!r} is not an amp_engine op; allowed: {', '.join(OPS)}")


@functools.lru_cache(maxsize=None)
def _triton_reason(device_type: str, op: str = DEFAULT_OP) -> str | None:
    """None if Triton can run `op` on `device_type`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec(OPS[op][1]) is None:
        return f"this build has no Triton kernel for {op}"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
        if importlib.util.find_spec("numpy") is None:
            return "the Triton interpreter (TRITON_INTERPRET=1) computes in numpy, which is not installed"
        return _interpreter_numpy_reason()
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    return f"Triton does not run on {device_type}"


def _version(dist: str) -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version(dist).split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _interpreter_numpy_reason() -> str | None:
    """Triton's interpreter before 3.8 fails on numpy >= 2.4 (its loop bounds become
    0-dim arrays that numpy 2.4 no longer converts to Python ints: "only 0-dimensional
    arrays can be converted to Python scalars"). Seen with triton 3.6, the GPU machine's."""
    try:
        if _version("triton") < (3, 8) and _version("numpy") >= (2, 4):
            return ("the Triton interpreter of triton < 3.8 fails with numpy >= 2.4; "
                    "install numpy < 2.4 or triton >= 3.8 to run Triton on CPU tensors")
    except Exception:  # noqa: BLE001 - no metadata (a source checkout): let it try
        return None
    return None


def unavailable_reason(backend: str, device: torch.device | str, op: str = DEFAULT_OP) -> str | None:
    """None if `backend` can run `op` on tensors on `device`, else a sentence saying why not."""
    _check_op(op)
    dtype = torch.device(device).type
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}"
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(dtype, op)
    if not _extension.LOADED:
        return f"the compiled library is not loaded ({_extension.LOAD_ERROR})"
    if backend == "cpp":
        if dtype != "cpu":
            return f"'cpp' runs CPU tensors only, got {dtype}"
        return None if _extension.has_kernels("CPU", op) else f"no CPU kernel for {op} was built"
    # backend == "cuda"
    if dtype != "cuda":
        return f"'cuda' runs CUDA tensors only, got {dtype}"
    if not _extension.has_kernels("CUDA", op):
        return f"the library was built without a CUDA kernel for {op}"
    return None if torch.cuda.is_available() else "no CUDA device"


def available_backends(device: torch.device | str = "cpu", op: str = DEFAULT_OP) -> list[str]:
    """The backends usable for `op` on tensors on `device`, fastest first."""
    dtype = torch.device(device).type
    order = _PREFERENCE.get(dtype, ("reference",)) + ("triton",)
    seen = []
    for b in order:
        if b not in seen and unavailable_reason(b, device, op) is None:
            seen.append(b)
    return seen


# AMP_ENGINE_BACKEND is read on every op call without os.environ.get's encode/decode
# (~1 us, a tenth of a small step's host time): os._Environ's own dict, where the
# platform has it, keyed by the encoded name; a changed value (monkeypatch.setenv,
# os.environ[...] = ...) is seen at the next call, as with os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("AMP_ENGINE_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_raw():
    if _ENV_DATA is not None and _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("AMP_ENGINE_BACKEND")


@functools.lru_cache(maxsize=None)
def _default_backend(device_type: str, env_raw, op: str) -> str:
    """The default for (device type, the variable's raw value as _env_raw reads it, op)."""
    env = os.environ.get("AMP_ENGINE_BACKEND") or None  # env_raw, decoded
    if env:
        reason = unavailable_reason(env, device_type, op)
        if reason is not None:
            raise RuntimeError(f"AMP_ENGINE_BACKEND={env!r} cannot run {op} on {device_type}: {reason}")
        return env
    for b in _PREFERENCE.get(device_type, ("reference",)):
        if unavailable_reason(b, device_type, op) is None:
            return b
    return "reference"


def select(backend: str | None, device: torch.device, op: str = DEFAULT_OP) -> str:
    """The backend to run `op` on `device`: `backend` if given (checked), else the default."""
    if backend is None:
        return _default_backend(device.type, _env_raw(), op)
    reason = _checked(backend, device.type, op)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op} on {device}: {reason}")
    return backend


@functools.lru_cache(maxsize=None)
def _checked(backend: str, device_type: str, op: str) -> str | None:
    return unavailable_reason(backend, device_type, op)


def python_backend(name: str, op: str):
    """The module implementing `op` for the Python backend `name` ("reference" or "triton")."""
    return importlib.import_module(OPS[op][0 if name == "reference" else 1])


def _register_fakes() -> None:
    """Shapes-only kernels so torch.compile / FakeTensor can trace the ops."""

    # The fakes validate too: a list mixing real and meta tensors lands here.
    @torch.library.register_fake("amp_engine::unscale_and_check_")
    def _(grads, inv_scale, found_inf, counts):
        validation.check_check_args(grads, inv_scale, found_inf, counts)
        return None

    @torch.library.register_fake("amp_engine::grad_norm_and_check")
    def _(grads, inv_scale, found_inf, counts, per_tensor, max_norm=None, clip_coef=None,
          step_scale=None):
        device = validation.check_check_args(grads, inv_scale, found_inf, counts)
        validation.check_clip_args(max_norm, clip_coef, step_scale, device)
        total = found_inf.new_empty((), dtype=torch.float32)
        per = found_inf.new_empty((len(grads) if per_tensor else 0,), dtype=torch.float32)
        return total, per

    @torch.library.register_fake("amp_engine::update_scale_")
    def _(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor,
          growth_interval, hysteresis, min_scale, max_scale, inv_scale=None, next_found_inf=None,
          counters=None, counts=None, ring=None):
        validation.check_bookkeeping_args(inv_scale, next_found_inf, counters, counts, ring,
                                          scale.device)
        return None


if _extension.LOADED:
    _register_fakes()
