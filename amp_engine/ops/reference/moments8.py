"""Plain-torch reference of ``adam_step_compact_``: Adam / AdamW with compact moments.

The truth every backend of the op is tested against (bitwise). Arguments, in the
order of the op (``amp_engine.ops.adam_step_compact_`` validates them):
``params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax,
steps, lr_tensor, lr, inv_scale, found_inf, rng_state, beta1, beta2, eps,
weight_decay, decoupled, maximize, stochastic_rounding``.

Per tensor, each moment's dtype names its format (:mod:`amp_engine.ops.moments8`, the format):
fp32 (plain), bf16 (written nearest-even) or uint8 (8-bit blocks: the codes in the
param's shape, contiguous, plus an fp32 absmax list entry of ``ceil(numel / 256)``).
Params are fp32/fp16/bf16 (fp64 params stay on ``adam_step_``); the update is
:mod:`amp_engine.ops.reference.optim`'s fp32 Adam arithmetic, done on the decoded
moments, after which the new moments are re-encoded (new absmax per block).
Elements are walked in row-major order: blocks are row-major runs of 256, and the
stochastic-rounding offset ``j`` of a bf16 param is its row-major index (one rule
for any layout). found_inf != 0 leaves everything bitwise unchanged, absmax included.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine.ops import moments8
from amp_engine.ops.reference.optim import round_host, exact_sqrt, round_bf16_stochastic, sr_bits


def load_moment(t: Tensor, absmax: Tensor | None, signed: bool) -> Tensor:
    """A moment in any format -> flat fp32 (row-major)."""
    if t.dtype == torch.uint8:
        return moments8.decode(t.reshape(-1), absmax, signed)
    return t.reshape(-1).to(torch.float32)


def store_moment(new: Tensor, t: Tensor, absmax: Tensor | None, signed: bool, keep: Tensor) -> None:
    """Write flat fp32 `new` into moment `t` in its format, unless `keep` (the skip)."""
    if t.dtype == torch.uint8:
        new_absmax = moments8.block_absmax(new)
        codes = moments8.encode(new, new_absmax, signed)
        t.copy_(torch.where(keep, t, codes.reshape(t.shape)))
        absmax.copy_(torch.where(keep, absmax, new_absmax))
    elif t.dtype == torch.bfloat16:
        t.copy_(torch.where(keep, t, moments8.round_bf16_nearest(new).reshape(t.shape)))
    else:
        t.copy_(torch.where(keep, t, new.reshape(t.shape)))


def adam_step_compact_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    exp_avg_absmax: Sequence[Tensor], exp_avg_sq_absmax: Sequence[Tensor],
    steps: Sequence[Tensor], lr_tensor: Tensor | None, lr: float, inv_scale: Tensor | None,
    found_inf: Tensor | None, rng_state: Tensor | None, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, maximize: bool, stochastic_rounding: bool,
) -> None:
    """One Adam / AdamW step with compact moments; see the module docstring."""
    if len(params) == 0:
        return
    device = params[0].device
    keep = (found_inf.reshape(()) != 0) if found_inf is not None else torch.zeros(
        (), dtype=torch.bool, device=device)
    lr64 = (lr_tensor.reshape(()).double() if lr_tensor is not None
            else torch.tensor(float(lr), dtype=torch.float64, device=device))
    if stochastic_rounding and rng_state is None and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("stochastic_rounding=True needs rng_state (int64 [seed, counter])")
    f32 = torch.float32

    def const(x: float) -> Tensor:
        return torch.tensor(x, dtype=f32, device=device)

    for i, p in enumerate(params):
        master = masters[i] if len(masters) else None
        m_t, v_t = exp_avgs[i], exp_avg_sqs[i]
        m_abs = exp_avg_absmax[i] if m_t.dtype == torch.uint8 else None
        v_abs = exp_avg_sq_absmax[i] if v_t.dtype == torch.uint8 else None
        step = steps[i].reshape(()).double() + 1.0
        bc1 = 1.0 - torch.pow(beta1, step)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step)).to(f32)
        neg_step_size = (-(lr64 / bc1)).to(f32)
        decay = (1.0 - lr64 * weight_decay).to(f32)

        g = grads[i].reshape(-1).to(f32)
        if inv_scale is not None:
            g = g * inv_scale.reshape(()).to(f32)
        if maximize:
            g = -g
        w = master.reshape(-1).clone() if master is not None else p.reshape(-1).to(f32)
        if weight_decay != 0:
            if decoupled:
                w = w * decay
            else:
                g = g + const(weight_decay) * w
        m = load_moment(m_t, m_abs, True)
        v = load_moment(v_t, v_abs, False)
        w1 = const(1.0 - beta1)
        if round_host(1.0 - beta1, f32) < 0.5:  # torch's lerp, as reference.optim
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * (1 - w1)
        v = v * const(beta2) + (const(1.0 - beta2) * g) * g
        denom = exact_sqrt(v) / bc2_sqrt + const(eps)
        w = w + (neg_step_size * m) / denom
        store_moment(m, m_t, m_abs, True, keep)
        store_moment(v, v_t, v_abs, False, keep)
        if master is not None:
            master.copy_(torch.where(keep, master, w.reshape(master.shape)))
        if stochastic_rounding and p.dtype == torch.bfloat16:
            j = torch.arange(p.numel(), device=device, dtype=torch.int64)
            new_p = round_bf16_stochastic(w, sr_bits(rng_state, i, j))
        else:
            new_p = w.to(p.dtype)
        p.copy_(torch.where(keep, p, new_p.reshape(p.shape)))
    applied = (~keep).to(f32)
    for s in steps:
        s.add_(applied.reshape(s.shape))
    if stochastic_rounding and rng_state is not None:
        rng_state[1:].add_((~keep).to(torch.int64))
