"""Argument checks for the Python backends (reference, Triton).

The compiled backends run the same checks in C++ (csrc/checks.h) so that the
hot path pays no per-tensor Python cost. Messages name the argument, the value
given and what is allowed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor_list(ts: Sequence[Tensor], name: str = "grads") -> torch.device | None:
    """Same device, strided, fp32/fp16/bf16/fp64. Returns the device (None if empty)."""
    if isinstance(ts, Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single Tensor")
    device = None
    for i, t in enumerate(ts):
        if t is None:
            raise ValueError(f"{name}[{i}] is None; pass only tensors that have a value")
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(
                f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are allowed "
                "(coalesce/densify sparse grads first)"
            )
        if t.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"{name}[{i}] has dtype {t.dtype}; allowed: float32, float16, bfloat16, float64"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"{name} must all be on one device: {name}[0] is on {device} "
                f"but {name}[{i}] is on {t.device}"
            )
    return device


def check_scalar_tensor(t: Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a one-element {dtype} tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype}")
    if t.numel() != 1:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected a one-element (0-dim) tensor")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tensors are on {device}")


def check_counts(counts: Tensor | None, n: int, device: torch.device) -> None:
    if counts is None:
        return
    if not isinstance(counts, Tensor):
        raise TypeError(f"counts must be an int64 tensor of shape [{n}], got {type(counts).__name__}")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts has dtype {counts.dtype}; expected int64")
    if counts.dim() != 1 or counts.shape[0] != n:
        raise ValueError(f"counts has shape {tuple(counts.shape)}; expected [{n}] (one slot per tensor)")
    if not counts.is_contiguous():
        raise ValueError("counts must be contiguous")
    if counts.device != device:
        raise ValueError(f"counts is on {counts.device} but the tensors are on {device}")


def check_check_args(grads, inv_scale, found_inf, counts) -> torch.device:
    """The common arguments of unscale_and_check_ / grad_norm_and_check."""
    device = check_tensor_list(grads, "grads")
    if device is None:
        device = found_inf.device if isinstance(found_inf, Tensor) else torch.device("cpu")
    check_scalar_tensor(inv_scale, "inv_scale", torch.float32, device)
    check_scalar_tensor(found_inf, "found_inf", torch.float32, device)
    check_counts(counts, len(grads), device)
    return device


def check_clip_args(max_norm, clip_coef, step_scale, device: torch.device) -> None:
    """grad_norm_and_check's clip outputs: written only when max_norm is given."""
    if max_norm is None:
        if clip_coef is not None or step_scale is not None:
            raise ValueError("clip_coef / step_scale given without max_norm; pass max_norm "
                             "(the clip threshold) to have them written")
        return
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a float, got {type(max_norm).__name__}")
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    for name, t in (("clip_coef", clip_coef), ("step_scale", step_scale)):
        if t is not None:
            check_scalar_tensor(t, name, torch.float32, device)


def check_bookkeeping_args(inv_scale, next_found_inf, counters, counts, ring, device) -> None:
    """update_scale_'s optional outputs (see reference.after_update_)."""
    if inv_scale is not None:
        check_scalar_tensor(inv_scale, "inv_scale", torch.float32, device)
    if next_found_inf is not None:
        check_scalar_tensor(next_found_inf, "next_found_inf", torch.float32, device)
    if counters is None:
        if counts is not None or ring is not None:
            raise ValueError("counts / ring given without counters; the ring's write position "
                             "is counters[1]")
        return
    if not isinstance(counters, Tensor) or counters.dtype != torch.int64 \
            or tuple(counters.shape) != (3,) or not counters.is_contiguous():
        got = (f"{counters.dtype} {tuple(counters.shape)}" if isinstance(counters, Tensor)
               else type(counters).__name__)
        raise ValueError(f"counters must be a contiguous int64 tensor of shape [3] (updates, "
                         f"overflow updates, last update above the floor); got {got}")
    if counters.device != device:
        raise ValueError(f"counters is on {counters.device} but scale is on {device}")
    if (counts is None) != (ring is None):
        raise ValueError("counts and ring go together: the ring keeps snapshots of counts")
    if ring is None:
        return
    if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.dim() != 1 \
            or not counts.is_contiguous() or counts.device != device:
        raise ValueError(f"counts must be a contiguous 1-D int64 tensor on {device}")
    n = counts.shape[0]
    if not isinstance(ring, Tensor) or ring.dtype != torch.int64 or ring.dim() != 2 \
            or ring.shape[0] < 1 or ring.shape[1] != n + 1 or not ring.is_contiguous() \
            or ring.device != device:
        got = f"{ring.dtype} {tuple(ring.shape)}" if isinstance(ring, Tensor) else type(ring).__name__
        raise ValueError(f"ring must be a contiguous int64 tensor [rows >= 1, {n + 1}] "
                         f"(the update index, then counts) on {device}; got {got}")


def check_update_scale_args(
    scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor,
    growth_interval, hysteresis, min_scale, max_scale, inv_scale=None, next_found_inf=None,
    counters=None, counts=None, ring=None,
) -> None:
    if not isinstance(scale, Tensor):
        raise TypeError(f"scale must be a one-element float32 tensor, got {type(scale).__name__}")
    dev = scale.device
    check_scalar_tensor(scale, "scale", torch.float32, dev)
    check_scalar_tensor(growth_tracker, "growth_tracker", torch.int32, dev)
    check_scalar_tensor(hysteresis_tracker, "hysteresis_tracker", torch.int32, dev)
    check_scalar_tensor(found_inf, "found_inf", torch.float32, dev)
    if not growth_factor > 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
    if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
        raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")
    if not min_scale > 0.0:
        raise ValueError(f"min_scale must be > 0, got {min_scale}")
    if not max_scale >= min_scale:
        raise ValueError(f"max_scale ({max_scale}) must be >= min_scale ({min_scale})")
    check_bookkeeping_args(inv_scale, next_found_inf, counters, counts, ring, dev)
