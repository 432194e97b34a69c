"""Adam's moment formats in optimizer state: choice, creation, conversion, export.

``exp_avg_dtype`` / ``exp_avg_sq_dtype`` (param-group options) are torch.float32
(default), torch.bfloat16 or torch.uint8 (8-bit blocks: :mod:`amp_engine.ops.moments8`).
A param gets its group's formats unless it has fewer than
``moments8.MIN_QUANTIZED_NUMEL`` (4,096) elements, is fp64, or is a DTensor (its
shards would cut blocks differently on each mesh): those keep full-precision
moments (fp32, fp64 for fp64 params).

State per param, by format: fp32/bf16 moments in the param's shape; 8-bit
moments as uint8 codes in the param's shape (contiguous, row-major blocks of 256)
plus ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (fp32, one per block). A
checkpoint holds them as they are; loading converts each moment to the
optimizer's format (dequantize -> fp32 -> requantize: a run can switch precision),
and a moment already in that format is kept bit for bit (exact resume).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amp_engine.ops import moments8

ALLOWED = (torch.float32, torch.bfloat16, torch.uint8)
#: (moment key, its absmax key, signed code map)
MOMENTS = (("exp_avg", "exp_avg_absmax", True), ("exp_avg_sq", "exp_avg_sq_absmax", False))
ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")

try:
    from torch.distributed.tensor import DTensor
except Exception:  # noqa: BLE001 - torch without distributed
    DTensor = None


def check_dtype(name: str, dtype: Any) -> torch.dtype:
    """Validate an ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` argument."""
    allowed = "torch.float32, torch.bfloat16 or torch.uint8 (8-bit blocks)"
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype ({allowed}), got {dtype!r}")
    if dtype not in ALLOWED:
        raise ValueError(f"{name}={dtype} is not supported; allowed: {allowed}")
    return dtype


def full_precision(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def target_dtype(p: Tensor, group: dict[str, Any], key: str) -> torch.dtype:
    """The format param `p` keeps moment `key` in under `group`'s options."""
    want = group.get(f"{key}_dtype", torch.float32)
    if (want == torch.float32 or p.dtype == torch.float64 or p.numel() < moments8.MIN_QUANTIZED_NUMEL
            or (DTensor is not None and isinstance(p, DTensor))):
        return full_precision(p)
    return want


def zeros(p: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint8:
        return torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def as_fp32(state: dict[str, Any], key: str, absmax_key: str, signed: bool) -> Tensor:
    """A moment of any format, decoded to fp32 in its param's shape."""
    t = state[key]
    if t.dtype == torch.uint8:
        return moments8.dequantize(t, state[absmax_key], signed)
    return t.to(torch.float32)


def conform(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
    """Create missing moments and convert present ones to the group's formats."""
    for key, absmax_key, signed in MOMENTS:
        want = target_dtype(p, group, key)
        t = state.get(key)
        if t is None:
            state[key] = zeros(p, want)
            if want == torch.uint8:
                state[absmax_key] = torch.zeros(moments8.n_blocks(p.numel()), dtype=torch.float32,
                                                device=p.device)
            else:
                state.pop(absmax_key, None)
            continue
        if t.dtype == want and (want != torch.uint8 or absmax_key in state):
            if want != torch.uint8:
                state.pop(absmax_key, None)
            continue
        value = as_fp32(state, key, absmax_key, signed).to(p.device)
        state.pop(absmax_key, None)
        if want == torch.uint8:
            state[key], state[absmax_key] = moments8.quantize(value.contiguous(), signed)
        elif want == torch.bfloat16:
            state[key] = moments8.round_bf16_nearest(value).reshape(p.shape)
        else:
            state[key] = value.to(want)


def validate(k: Any, st: dict[str, Any], p: Tensor) -> None:
    """A saved param state's moments are well formed for `p` (ValueError otherwise)."""
    for key, absmax_key, _ in MOMENTS:
        t = st.get(key)
        if not isinstance(t, Tensor) or t.dtype != torch.uint8:
            continue
        a = st.get(absmax_key)
        want = (moments8.n_blocks(p.numel()),)
        if not isinstance(a, Tensor) or a.dtype != torch.float32 or tuple(a.shape) != want:
            got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, Tensor) else repr(a)
            raise ValueError(f"state[{k}][{key!r}] holds 8-bit codes but state[{k}][{absmax_key!r}] "
                             f"is {got}; expected a float32 tensor of shape {want}")


#: param-group keys that are amp_engine's own (not torch.optim.AdamW's)
OWN_GROUP_KEYS = ("master_weights", "stochastic_rounding", "rng_state", "exp_avg_dtype",
                  "exp_avg_sq_dtype")


def fp32_state_dict(optimizer) -> dict[str, Any]:
    """The optimizer's state dict in torch.optim.AdamW / Adam's format, moments in fp32."""
    sd = optimizer.state_dict()
    state = {}
    for k, st in sd["state"].items():
        out = {key: v for key, v in st.items()
               if key not in ABSMAX_KEYS + ("master", "exp_avg", "exp_avg_sq")}
        for key, absmax_key, signed in MOMENTS:
            if key in st:  # fp64 moments (fp64 params) stay fp64
                out[key] = (st[key].clone() if st[key].dtype == torch.float64
                            else as_fp32(st, key, absmax_key, signed).clone())
        state[k] = out
    groups = [{key: v for key, v in g.items() if key not in OWN_GROUP_KEYS}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}
