"""The loss-scaling ops: one Python entry per op, each choosing a backend.

All tensors of one call live on one device; lists may mix fp32/fp16/bf16/fp64.
The compiled backends validate in C++, so the hot path costs one dispatcher
call per op however many tensors the list holds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine.ops import dispatch, validation
from amp_engine.ops.reference.scaling import DEFAULT_MAX_SCALE, DEFAULT_MIN_SCALE



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
    grads = list(grads)
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
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """L2 norm of the unscaled grads (``g * inv_scale``), read-only, with the inf check.

    Returns the total norm as an fp32 0-dim tensor on the grads' device, and
    with ``per_tensor=True`` also the fp32 ``[len(grads)]`` per-tensor norms (a
    non-finite one names the overflowing tensor). ``found_inf`` and ``counts``
    are updated exactly as by :func:`unscale_and_check_`, so the clip pass and
    the inf check are one pass over the grads.
    """
    grads = list(grads)
    device = _device_of(grads, found_inf)
    name = dispatch.select(backend, device, "grad_norm_and_check")
    if name in ("cpp", "cuda"):
        total, per = _compiled(torch.ops.amp_engine.grad_norm_and_check, grads, inv_scale,
                               found_inf, counts, bool(per_tensor))
    else:
        validation.check_check_args(grads, inv_scale, found_inf, counts)
        total, per = dispatch.python_backend(name, "grad_norm_and_check").grad_norm_and_check(
            grads, inv_scale, found_inf, counts, bool(per_tensor)
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
    """
    name = dispatch.select(backend, scale.device if isinstance(scale, Tensor) else torch.device("cpu"),
                           "update_scale_")
    args = (
        scale, growth_tracker, hysteresis_tracker, found_inf, float(growth_factor),
        float(backoff_factor), growth_interval, hysteresis, float(min_scale), float(max_scale),
    )
    if name in ("cpp", "cuda"):
        torch.ops.amp_engine.update_scale_(*args)
        return
    validation.check_update_scale_args(*args)
    dispatch.python_backend(name, "update_scale_").update_scale_(*args)
