"""The loss-scaling ops: one Python entry per op, each choosing a backend.

All tensors of one call live on one device; lists may mix fp32/fp16/bf16/fp64.
The compiled backends validate in C++, so the hot path costs one dispatcher
call per op however many tensors the list holds.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine import _extension
from amp_engine.ops import dispatch, validation
from amp_engine.ops.reference import scaling as _reference
from amp_engine.ops.reference.scaling import DEFAULT_MAX_SCALE, DEFAULT_MIN_SCALE


@functools.lru_cache(maxsize=None)
def compiled_takes(op: str, arg: str) -> bool:
    """Whether the compiled ``amp_engine::<op>`` schema has argument ``arg``.

    A library built before the op-budget contract (clip outputs in
    grad_norm_and_check, bookkeeping in update_scale_) lacks them: the entries
    then do that part with the reference's tensor ops after the compiled op
    (same results, a few more ops per step).
    """
    if not _extension.LOADED or not hasattr(torch.ops.amp_engine, op):
        return False
    return any(a.name == arg for a in getattr(torch.ops.amp_engine, op).default._schema.arguments)


# read once at import: the entries below are traced by torch.compile, which
# cannot look into the schema object (a pybind one)
_CLIP_IN_KERNEL = compiled_takes("grad_norm_and_check", "max_norm")
_BOOKKEEPING_IN_KERNEL = compiled_takes("update_scale_", "counters")


def _device_of(grads: Sequence[Tensor], fallback: Tensor) -> torch.device:
    for g in grads:
        if isinstance(g, Tensor):
            return g.device
    return fallback.device if isinstance(fallback, Tensor) else torch.device("cpu")


def _compiled(op, grads, inv_scale, found_inf, counts, *rest):
    """Call a compiled op. Errors the binding raises before the kernel's own
    checks (a None or non-tensor in `grads`, a sparse grad) do not name the
    argument: on failure the Python checks run and raise their precise error
    (free on the hot path)."""
    try:
        return op(grads, inv_scale, found_inf, counts, *rest)
    except (RuntimeError, ValueError, TypeError):
        validation.check_check_args(grads, inv_scale, found_inf, counts)
        raise


def unscale_and_check_(
    grads: Sequence[Tensor],
    inv_scale: Tensor,
    found_inf: Tensor,
    counts: Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Multiply every grad by ``inv_scale`` in place and flag non-finite values.

    Args:
        grads: tensors on one device, fp32/fp16/bf16/fp64, any shape (0-size too).
        inv_scale: one-element fp32 tensor on the grads' device.
        found_inf: one-element fp32 tensor; set to 1.0 if any element is
            non-finite before or after scaling (rounded to the grad's dtype);
            never reset to 0 here.
        counts: optional int64 ``[len(grads)]``; each tensor's number of
            non-finite elements is added to its slot (overflow attribution).
        backend: None (fastest for the device), "cuda", "triton", "cpp" or "reference".
    """
    grads = grads if type(grads) is list else list(grads)  # no copy of the scaler's list
    device = _device_of(grads, found_inf)
    name = dispatch.select(backend, device, "unscale_and_check_")
    if name in ("cpp", "cuda"):
        _compiled(torch.ops.amp_engine.unscale_and_check_, grads, inv_scale, found_inf, counts)
        return
    validation.check_check_args(grads, inv_scale, found_inf, counts)
    dispatch.python_backend(name, "unscale_and_check_").unscale_and_check_(grads, inv_scale, found_inf, counts)


def grad_norm_and_check(
    grads: Sequence[Tensor],
    inv_scale: Tensor,
    found_inf: Tensor,
    counts: Tensor | None = None,
    *,
    per_tensor: bool = False,
    max_norm: float | None = None,
    clip_coef: Tensor | None = None,
    step_scale: Tensor | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """L2 norm of the unscaled grads (``g * inv_scale``), read-only, with the inf check.

    Returns the total norm as an fp32 0-dim tensor on the grads' device, and
    with ``per_tensor=True`` also the fp32 ``[len(grads)]`` per-tensor norms (a
    non-finite one names the overflowing tensor). ``found_inf`` and ``counts``
    are updated exactly as by :func:`unscale_and_check_`, so the clip pass and
    the inf check are one pass over the grads.
    """
    grads = grads if type(grads) is list else list(grads)  # no copy of the scaler's list
    device = _device_of(grads, found_inf)
    name = dispatch.select(backend, device, "grad_norm_and_check")
    if max_norm is not None and not isinstance(max_norm, bool) and isinstance(max_norm, int):
        max_norm = float(max_norm)
    if name in ("cpp", "cuda"):
        op = torch.ops.amp_engine.grad_norm_and_check
        if _CLIP_IN_KERNEL:
            total, per = _compiled(op, grads, inv_scale, found_inf, counts, bool(per_tensor),
                                   max_norm, clip_coef, step_scale)
        else:
            validation.check_clip_args(max_norm, clip_coef, step_scale, device)
            total, per = _compiled(op, grads, inv_scale, found_inf, counts, bool(per_tensor))
            _reference.clip_outputs_(total, inv_scale, max_norm, clip_coef, step_scale)
    else:
        validation.check_check_args(grads, inv_scale, found_inf, counts)
        validation.check_clip_args(max_norm, clip_coef, step_scale, device)
        total, per = dispatch.python_backend(name, "grad_norm_and_check").grad_norm_and_check(
            grads, inv_scale, found_inf, counts, bool(per_tensor), max_norm, clip_coef, step_scale
        )
    return (total, per) if per_tensor else total


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    hysteresis_tracker: Tensor,
    found_inf: Tensor,
    *,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = DEFAULT_MIN_SCALE,
    max_scale: float = DEFAULT_MAX_SCALE,
    inv_scale: Tensor | None = None,
    next_found_inf: Tensor | None = None,
    counters: Tensor | None = None,
    counts: Tensor | None = None,
    ring: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Update the loss scale on its device (one thread, no host sync).

    ``scale`` fp32, ``growth_tracker`` and ``hysteresis_tracker`` int32,
    ``found_inf`` fp32: one-element tensors on one device. With
    ``hysteresis=1`` and the bounds not reached this is exactly
    ``torch._amp_update_scale_``. Hysteresis (apex's meaning): the scale backs
    off on the ``hysteresis``-th consecutive overflow and on every one after it;
    any clean step refills the tracker, so isolated spikes never cut the scale
    while persistent overflow still does. Back-off never goes below
    ``min_scale``; growth never above ``max_scale`` nor to inf.

    The same launch does the step's bookkeeping (each optional, see
    ``reference.after_update_``): ``inv_scale`` gets the next step's unscale
    multiplier, ``next_found_inf`` is zeroed, ``counters`` (int64 [3]) count
    updates, overflow updates and the last update above the floor, and ``ring``
    keeps a snapshot of ``counts`` per overflow (overflow attribution).
    """
    name = dispatch.select(backend, scale.device if isinstance(scale, Tensor) else torch.device("cpu"),
                           "update_scale_")
    args = (
        scale, growth_tracker, hysteresis_tracker, found_inf, float(growth_factor),
        float(backoff_factor), growth_interval, hysteresis, float(min_scale), float(max_scale),
    )
    extra = (inv_scale, next_found_inf, counters, counts, ring)
    if name in ("cpp", "cuda"):
        if _BOOKKEEPING_IN_KERNEL:
            torch.ops.amp_engine.update_scale_(*args, *extra)
            return
        validation.check_bookkeeping_args(*extra, scale.device)
        torch.ops.amp_engine.update_scale_(*args)
        _reference.after_update_(scale, found_inf, float(min_scale), *extra)
        return
    validation.check_update_scale_args(*args, *extra)
    dispatch.python_backend(name, "update_scale_").update_scale_(*args, *extra)
