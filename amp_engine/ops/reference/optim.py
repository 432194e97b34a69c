"""Plain-torch reference of the fused optimizer steps: the truth for every backend.

``adam_step_`` (Adam / AdamW) and ``sgd_step_`` take the arguments of the op
schemas in csrc/ops.cpp, positionally and in the same order. One tensor at a
time, written for clarity; no host sync (the skip decision is a ``torch.where``
on the device), so it also runs inside a captured step.

Arithmetic contract (kernels that do the same operations in the same order,
each correctly rounded and without fused multiply-adds, agree bitwise; fused
multiply-adds cost at most a few ulps). ``acc`` is fp32, or fp64 for fp64 params:

* scalars from the hyper-parameters are computed in fp64, then rounded to
  ``acc`` once: ``bc1 = 1 - beta1**step``, ``bc2_sqrt = sqrt(1 - beta2**step)``
  (``step`` = the incremented counter), ``neg_step_size = -(lr / bc1)``,
  ``decay = 1 - lr * weight_decay``, ``w1 = 1 - beta1``, ``omb2 = 1 - beta2``;
* ``g = acc(grad) * inv_scale`` (skipped when inv_scale is None), ``g = -g``
  when maximize; ``w`` = the master, or ``acc(param)`` without one;
* Adam: decoupled ``w = w * decay``, else ``g = g + wd * w`` (when wd != 0);
  ``m = m + w1 * (g - m)`` if ``w1 < 0.5`` else ``m = g - (g - m) * (1 - w1)``
  (torch's lerp); ``v = v * beta2 + (omb2 * g) * g``; amsgrad: ``vmax =
  max(vmax, v)`` and ``v`` below means vmax; ``denom = sqrt(v) / bc2_sqrt + eps``;
  ``w = w + (neg_step_size * m) / denom``;
* SGD: ``g = g + wd * w`` (wd != 0); momentum: ``buf = g`` if the step counter
  was 0, else ``buf = buf * momentum + (1 - dampening) * g``; nesterov ``g = g +
  momentum * buf`` else ``g = buf``; ``w = w + (-lr) * g``;
* the master (or the param) gets ``w``; a param with a master gets ``w``
  rounded to its dtype: nearest-even, or for bf16 with ``stochastic_rounding``
  ``bits(w) + r`` truncated to the upper 16 bits, r a 16-bit random number
  (NaN stays a quiet NaN). ``sqrt`` is correctly rounded for fp32 (fp64
  sqrt may differ by an ulp between backends). These are torch's single-tensor (foreach=False)
  formulas, so fp32 params match torch.optim within a few ulps.

Stochastic-rounding bits (identical in every backend): with ``mix32`` the
lowbias32 hash below on uint32, ``seed = rng_state[0]``, ``counter =
rng_state[1]`` (the value before this step), ``i`` the tensor's index in the
call and ``j`` the element's offset in the param's memory (the row-major index
if the param's tensors do not all share one dense layout):
``key_i = mix32(mix32(mix32(lo32(seed) ^ hi32(seed)) ^ lo32(counter)) ^ i)``,
``r = mix32(lo32(j) ^ key_i ^ mix32(hi32(j))) >> 16``.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: Tensor | int) -> Tensor | int:
    """lowbias32 (C. Wellons): a bijective uint32 hash; int64 tensors or ints in [0, 2**32)."""
    if isinstance(x, int):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & _M32
        x ^= x >> 15
        x = (x * 0x735A2D97) & _M32
        x ^= x >> 15
        return x
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and, on every dimension longer than 1, the same stride."""
    if a.shape != b.shape:
        return False
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements fill a gap-free block (any dim order)."""
    expected = 1
    for stride, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def walks_memory(tensors: Sequence[Tensor]) -> bool:
    """Whether a kernel walks these tensors' memory as is (all dense, one layout)."""
    p = tensors[0]
    return all(is_dense(t) and same_layout(t, p) for t in tensors)


def _positions(p: Tensor, in_memory: bool) -> Tensor:
    """int64 offsets j of each element of p (shape of p)."""
    if not in_memory:
        return torch.arange(p.numel(), device=p.device, dtype=torch.int64).reshape(p.shape)
    j = torch.zeros(p.shape, dtype=torch.int64, device=p.device)
    for d, (n, s) in enumerate(zip(p.shape, p.stride())):
        shape = [1] * p.dim()
        shape[d] = n
        j = j + (torch.arange(n, device=p.device, dtype=torch.int64) * s).reshape(shape)
    return j


def sr_bits(rng_state: Tensor, index: int, positions: Tensor) -> Tensor:
    """The 16-bit random numbers (int64 in [0, 65536)) of tensor `index`."""
    seed, counter = rng_state[0], rng_state[1]
    key = mix32(((seed & _M32) ^ ((seed >> 32) & _M32)))
    key = mix32(key ^ (counter & _M32))
    key = mix32(key ^ index)
    j_lo, j_hi = positions & _M32, (positions >> 32) & _M32
    return mix32(j_lo ^ key ^ mix32(j_hi)) >> 16


def round_bf16_stochastic(w: Tensor, r: Tensor) -> Tensor:
    """fp32 -> bf16: add r (16 random bits) below bf16 precision, truncate."""
    bits = w.view(torch.int32).to(torch.int64) & _M32
    up = ((bits + r) & 0xFFFF0000) >> 16
    up = torch.where(torch.isnan(w), torch.full_like(up, 0x7FC0), up)
    up = torch.where(up >= 0x8000, up - 0x10000, up)  # as int16 bit pattern
    return up.to(torch.int16).view(torch.bfloat16)


def round_host(x: float, dtype: torch.dtype) -> float:
    """x rounded to fp32 (or kept as fp64), on the host."""
    return struct.unpack("f", struct.pack("f", x))[0] if dtype == torch.float32 else x


def exact_sqrt(x: Tensor) -> Tensor:
    """Correctly rounded fp32 sqrt (torch's CPU sqrt is not: it may be 1 ulp off);
    fp64 is taken as torch computes it (kernels may differ there by an ulp)."""
    return torch.sqrt(x.double()).float() if x.dtype == torch.float32 else torch.sqrt(x)


def _write_weight(p, master, w, keep, rng_state, index, in_memory, stochastic_rounding):
    """Store w into the master (if any) and the param, unless `keep` (skip)."""
    if master is not None:
        master.copy_(torch.where(keep, master, w))
    if stochastic_rounding and p.dtype == torch.bfloat16:
        new_p = round_bf16_stochastic(w.float(), sr_bits(rng_state, index, _positions(p, in_memory)))
    else:
        new_p = w.to(p.dtype)
    p.copy_(torch.where(keep, p, new_p))


def _prologue(params, lr_tensor, lr, found_inf, rng_state, stochastic_rounding):
    device = params[0].device if len(params) else torch.device("cpu")
    keep = (found_inf.reshape(()) != 0) if found_inf is not None else torch.zeros((), dtype=torch.bool, device=device)
    lr64 = lr_tensor.reshape(()).double() if lr_tensor is not None else torch.tensor(float(lr), dtype=torch.float64, device=device)
    if stochastic_rounding and rng_state is None and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("stochastic_rounding=True needs rng_state (int64 [seed, counter])")
    return keep, lr64


def _epilogue(steps, keep, rng_state, stochastic_rounding):
    applied = (~keep).to(torch.float32)
    for s in steps:
        s.add_(applied.reshape(s.shape))
    if stochastic_rounding and rng_state is not None:
        rng_state[1:].add_((~keep).to(torch.int64))


def adam_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor], lr_tensor: Tensor | None, lr: float, inv_scale: Tensor | None,
    found_inf: Tensor | None, rng_state: Tensor | None, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
    stochastic_rounding: bool,
) -> None:
    """Adam (decoupled=False) / AdamW (decoupled=True) step; see the module docstring."""
    if len(params) == 0:
        return
    keep, lr64 = _prologue(params, lr_tensor, lr, found_inf, rng_state, stochastic_rounding)
    for i, p in enumerate(params):
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        master = masters[i] if len(masters) else None
        m, v = exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        step = steps[i].reshape(()).double() + 1.0
        bc1 = 1.0 - torch.pow(beta1, step)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step)).to(acc)
        neg_step_size = (-(lr64 / bc1)).to(acc)
        decay = (1.0 - lr64 * weight_decay).to(acc)
        in_memory = walks_memory([t for t in (p, grads[i], master, m, v, vmax) if t is not None])

        g = grads[i].to(acc)
        if inv_scale is not None:
            g = g * inv_scale.reshape(()).to(acc)
        if maximize:
            g = -g
        w = master.clone() if master is not None else p.to(acc)
        if weight_decay != 0:
            if decoupled:
                w = w * decay
            else:
                g = g + torch.tensor(weight_decay, dtype=acc, device=p.device) * w
        w1 = torch.tensor(1.0 - beta1, dtype=acc, device=p.device)
        # torch's lerp: the branch is on the weight rounded to acc (a host value)
        if round_host(1.0 - beta1, acc) < 0.5:
            new_m = m + w1 * (g - m)
        else:
            new_m = g - (g - m) * (1 - w1)
        omb2 = torch.tensor(1.0 - beta2, dtype=acc, device=p.device)
        new_v = v * torch.tensor(beta2, dtype=acc, device=p.device) + (omb2 * g) * g
        v_use = new_v
        if amsgrad:
            v_use = torch.maximum(vmax, new_v)
            vmax.copy_(torch.where(keep, vmax, v_use))
        denom = exact_sqrt(v_use) / bc2_sqrt + torch.tensor(eps, dtype=acc, device=p.device)
        w = w + (neg_step_size * new_m) / denom
        m.copy_(torch.where(keep, m, new_m))
        v.copy_(torch.where(keep, v, new_v))
        _write_weight(p, master, w, keep, rng_state, i, in_memory, stochastic_rounding)
    _epilogue(steps, keep, rng_state, stochastic_rounding)


def sgd_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor], steps: Sequence[Tensor], lr_tensor: Tensor | None,
    lr: float, inv_scale: Tensor | None, found_inf: Tensor | None, rng_state: Tensor | None,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    stochastic_rounding: bool,
) -> None:
    """SGD step (torch's formulas, momentum/dampening/nesterov); see the module docstring."""
    if len(params) == 0:
        return
    keep, lr64 = _prologue(params, lr_tensor, lr, found_inf, rng_state, stochastic_rounding)
    for i, p in enumerate(params):
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        master = masters[i] if len(masters) else None
        buf = momentum_buffers[i] if momentum != 0 else None
        in_memory = walks_memory([t for t in (p, grads[i], master, buf) if t is not None])
        neg_lr = (-lr64).to(acc)

        g = grads[i].to(acc)
        if inv_scale is not None:
            g = g * inv_scale.reshape(()).to(acc)
        if maximize:
            g = -g
        w = master.clone() if master is not None else p.to(acc)
        if weight_decay != 0:
            g = g + torch.tensor(weight_decay, dtype=acc, device=p.device) * w
        if buf is not None:
            mom = torch.tensor(momentum, dtype=acc, device=p.device)
            first = steps[i].reshape(()) == 0
            new_buf = torch.where(
                first, g, buf * mom + torch.tensor(1.0 - dampening, dtype=acc, device=p.device) * g
            )
            g = g + mom * new_buf if nesterov else new_buf
            buf.copy_(torch.where(keep, buf, new_buf))
        w = w + neg_lr * g
        _write_weight(p, master, w, keep, rng_state, i, in_memory, stochastic_rounding)
    _epilogue(steps, keep, rng_state, stochastic_rounding)
