"""Triton kernels of the fused optimizer steps (launched by :mod:`amp_engine.ops.triton.optim`).

Arithmetic: exactly :mod:`amp_engine.ops.reference.optim`, so the GPU and
``TRITON_INTERPRET=1`` (CPU) agree with it bitwise:

* no fused multiply-adds (the launcher passes ``enable_fp_fusion=False``), IEEE
  division and square root (``div_rn`` / ``sqrt_rn``: the default fp32 ``/`` and
  ``sqrt`` are approximations on the GPU);
* bf16 is loaded and stored as its uint16 bit pattern and converted with integer
  ops: the interpreter computes bf16 arithmetic wrongly and truncates fp32 -> bf16
  casts, while the reference rounds to nearest even (or stochastically);
* hyper-parameters arrive as the int64 bit patterns of fp64 values: a Python float
  argument would be an fp32 in the interpreter;
* ``found_inf`` is read by every program on the device: nothing is read or written
  when it is non-zero, and the host never waits for it.

Tensor table (int64, one column per tensor of the group, ``n`` columns): rows of
addresses (param, grad, master, state...), then the step counter's address, numel
and the tensor's index in the call; after it the chunk table: ``n_chunks`` tensor
columns, then ``n_chunks`` chunk numbers. One program per chunk of CHUNK_SIZE.
"""
import math
import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:  # the interpreter runs on numpy: it is there whenever this branch is
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    def pow_f64(base, exponent):
        """fp64 pow for the interpreter, which has no libdevice: libm's pow, as torch on CPU."""
        b, e = np.broadcast_arrays(base.handle.data, exponent.handle.data)
        out = np.array([math.pow(float(x), float(y)) for x, y in zip(b.flat, e.flat)],
                       dtype=np.float64).reshape(b.shape)
        return tl.tensor(TensorHandle(out, tl.float64), tl.float64)
else:
    from triton.language.extra import libdevice

    pow_f64 = libdevice.pow  # __nv_pow: what torch.pow runs for fp64 on the GPU


# ------------------------------------------------------------------ device helpers
@triton.jit
def f64(bits):
    """An fp64 value from its int64 bit pattern (the interpreter may type small ints int32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _div(a, b, IS_F64: tl.constexpr):
    if IS_F64:
        return a / b  # div.rn.f64: fp64 division is IEEE on the GPU
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.sqrt(x)  # sqrt.rn.f64
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (optim_reference.mix32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x735A2D97, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def table_ptr(table, row, n, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + row * n + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the host checked 16-byte alignment: vector loads (the hint must be on the pointer)
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def load_acc(ptr, offs, mask, IS_BF16: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    x = _load(ptr, offs, mask, MASKED)
    if IS_BF16:  # uint16 bits -> fp32, exact; no bf16 arithmetic anywhere
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def store_param(ptr, offs, w, mask, key, P_DT: tl.constexpr, IS_BF16: tl.constexpr,
                 STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    """Write w (acc) into the param: bf16 by integer rounding (nearest even or stochastic)."""
    if IS_BF16:
        bits = w.to(tl.float32).to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            j = offs.to(tl.int64)  # element offset in the param's memory
            r = _mix32(j.to(tl.uint32) ^ key ^ _mix32((j >> 32).to(tl.uint32))) >> 16
            up = (bits + r) >> 16
        else:
            up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        up = tl.where(w != w, tl.full([], 0x7FC0, tl.uint32), up)  # NaN stays a quiet NaN
        _store(ptr, offs, up.to(tl.uint16), mask, MASKED)
    else:
        _store(ptr, offs, w.to(P_DT), mask, MASKED)


@triton.jit
def sr_key(rng_state, index, STOCHASTIC: tl.constexpr):
    """key_i of the reference: the seed, the counter before this step and the tensor index."""
    if STOCHASTIC:
        seed = tl.load(rng_state)
        counter = tl.load(rng_state + 1)
        key = _mix32(seed.to(tl.uint32) ^ (seed >> 32).to(tl.uint32))
        key = _mix32(key ^ counter.to(tl.uint32))
        return _mix32(key ^ index.to(tl.uint32))
    else:
        return tl.full([], 0, tl.uint32)


@triton.jit
def applied(found_inf, HAS_FOUND_INF: tl.constexpr):
    if HAS_FOUND_INF:
        return tl.load(found_inf) == 0  # a NaN flag is "not 0" too: skip
    else:
        return True


@triton.jit
def lr_of(lr_tensor, lr_bits, HAS_LR_TENSOR: tl.constexpr):
    if HAS_LR_TENSOR:
        return tl.load(lr_tensor).to(tl.float64)  # fp32 or fp64 on the device: no sync
    else:
        return f64(lr_bits)


@triton.jit
def grad_multiplier(inv_scale, ACC: tl.constexpr, HAS_INV: tl.constexpr):
    if HAS_INV:
        return tl.load(inv_scale).to(ACC)
    else:
        return tl.full([], 1.0, ACC)


# ------------------------------------------------------------------ Adam / AdamW
@triton.jit
def _adam_block(offs, mask, ptrs, sc, P_DT: tl.constexpr, P_BF16: tl.constexpr,
                G_BF16: tl.constexpr, ACC: tl.constexpr, IS_F64: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_INV: tl.constexpr, HAS_WD: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                LERP_SMALL: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    p_ptr, g_ptr, w_ptr, m_ptr, v_ptr, vmax_ptr = ptrs
    inv, decay, wd, w1, omw1, beta2, omb2, eps, bc2_sqrt, neg_step, key = sc
    g = load_acc(g_ptr, offs, mask, G_BF16, ACC, MASKED)
    if HAS_INV:
        g = g * inv
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        w = _load(w_ptr, offs, mask, MASKED)
    else:
        w = load_acc(p_ptr, offs, mask, P_BF16, ACC, MASKED)
    if HAS_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = g + wd * w
    m = _load(m_ptr, offs, mask, MASKED)
    if LERP_SMALL:  # torch's lerp: two formulas, chosen by the weight (as the reference)
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * omw1
    v = _load(v_ptr, offs, mask, MASKED)
    v = v * beta2 + (omb2 * g) * g
    v_use = v
    if AMSGRAD:
        vmax = _load(vmax_ptr, offs, mask, MASKED)
        v_use = tl.where(v > vmax, v, vmax)
        v_use = tl.where(v != v, v, v_use)  # torch.maximum propagates NaN from either side
        _store(vmax_ptr, offs, v_use, mask, MASKED)
    denom = _div(_sqrt(v_use, IS_F64), bc2_sqrt, IS_F64) + eps
    w = w + _div(neg_step * m, denom, IS_F64)
    _store(m_ptr, offs, m, mask, MASKED)
    _store(v_ptr, offs, v, mask, MASKED)
    if HAS_MASTER:
        _store(w_ptr, offs, w, mask, MASKED)
    store_param(p_ptr, offs, w, mask, key, P_DT, P_BF16, STOCHASTIC, MASKED)


@triton.jit(do_not_specialize=["n", "n_chunks", "hyper"])
def adam_kernel(table, n, n_chunks, found_inf, inv_scale, lr_tensor, rng_state, hyper,
                 P_DT: tl.constexpr, G_DT: tl.constexpr, P_BF16: tl.constexpr,
                 G_BF16: tl.constexpr, ACC: tl.constexpr, IS_F64: tl.constexpr,
                 HAS_MASTER: tl.constexpr, HAS_INV: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, LERP_SMALL: tl.constexpr,
                 STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK_SIZE: tl.constexpr):
    # hyper: fp64 bits of lr, beta1, beta2, wd, then acc-rounded w1, beta2, 1-beta2, eps, wd
    if applied(found_inf, HAS_FOUND_INF):
        pid = tl.program_id(0)
        t = tl.load(table + 9 * n + pid)  # chunk table after the 9 rows of the tensor table
        start = tl.load(table + 9 * n + n_chunks + pid) * CHUNK_SIZE
        ptrs = (table_ptr(table, 0, n, t, P_DT, ALIGNED), table_ptr(table, 1, n, t, G_DT, ALIGNED),
                table_ptr(table, 2, n, t, tl.float32, ALIGNED),
                table_ptr(table, 3, n, t, ACC, ALIGNED), table_ptr(table, 4, n, t, ACC, ALIGNED),
                table_ptr(table, 5, n, t, ACC, ALIGNED))
        step_ptr = tl.load(table + 6 * n + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(table + 7 * n + t)
        key = sr_key(rng_state, tl.load(table + 8 * n + t), STOCHASTIC)
        # Per-tensor scalars in fp64, rounded to ACC once (the reference's order).
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        lr = lr_of(lr_tensor, hyper[0], HAS_LR_TENSOR)
        bc1 = 1.0 - pow_f64(f64(hyper[1]), step)
        bc2_sqrt = tl.sqrt(1.0 - pow_f64(f64(hyper[2]), step)).to(ACC)
        w1 = f64(hyper[4]).to(ACC)
        sc = (grad_multiplier(inv_scale, ACC, HAS_INV), (1.0 - lr * f64(hyper[3])).to(ACC),
              f64(hyper[8]).to(ACC), w1, 1.0 - w1, f64(hyper[5]).to(ACC),
              f64(hyper[6]).to(ACC), f64(hyper[7]).to(ACC), bc2_sqrt, (-(lr / bc1)).to(ACC), key)
        for base in range(start, start + CHUNK_SIZE, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            if ALIGNED:
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
            mask = offs < numel
            # Full blocks go unmasked so the GPU can use vector loads; the tail is masked.
            if base + BLOCK <= numel:
                _adam_block(offs, mask, ptrs, sc, P_DT, P_BF16, G_BF16, ACC, IS_F64, HAS_MASTER,
                            HAS_INV, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, LERP_SMALL, STOCHASTIC,
                            False)
            elif base < numel:
                _adam_block(offs, mask, ptrs, sc, P_DT, P_BF16, G_BF16, ACC, IS_F64, HAS_MASTER,
                            HAS_INV, HAS_WD, DECOUPLED, AMSGRAD, MAXIMIZE, LERP_SMALL, STOCHASTIC,
                            True)


# ------------------------------------------------------------------ SGD
@triton.jit
def _sgd_block(offs, mask, ptrs, sc, first, P_DT: tl.constexpr, P_BF16: tl.constexpr,
               G_BF16: tl.constexpr, ACC: tl.constexpr, HAS_MASTER: tl.constexpr,
               HAS_INV: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
               MASKED: tl.constexpr):
    p_ptr, g_ptr, w_ptr, buf_ptr = ptrs
    inv, wd, mom, damp, neg_lr, key = sc
    g = load_acc(g_ptr, offs, mask, G_BF16, ACC, MASKED)
    if HAS_INV:
        g = g * inv
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        w = _load(w_ptr, offs, mask, MASKED)
    else:
        w = load_acc(p_ptr, offs, mask, P_BF16, ACC, MASKED)
    if HAS_WD:
        g = g + wd * w
    if HAS_MOMENTUM:
        if first:  # torch's first step: the buffer starts as the grad (its memory is not read)
            buf = g
        else:
            buf = _load(buf_ptr, offs, mask, MASKED) * mom + damp * g
        _store(buf_ptr, offs, buf, mask, MASKED)
        if NESTEROV:
            g = g + mom * buf
        else:
            g = buf
    w = w + neg_lr * g
    if HAS_MASTER:
        _store(w_ptr, offs, w, mask, MASKED)
    store_param(p_ptr, offs, w, mask, key, P_DT, P_BF16, STOCHASTIC, MASKED)


@triton.jit(do_not_specialize=["n", "n_chunks", "hyper"])
def sgd_kernel(table, n, n_chunks, found_inf, inv_scale, lr_tensor, rng_state, hyper,
                P_DT: tl.constexpr, G_DT: tl.constexpr, P_BF16: tl.constexpr,
                G_BF16: tl.constexpr, ACC: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_INV: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                HAS_LR_TENSOR: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    # hyper: fp64 bits of lr, then acc-rounded wd, momentum, 1 - dampening
    if applied(found_inf, HAS_FOUND_INF):
        pid = tl.program_id(0)
        t = tl.load(table + 7 * n + pid)  # chunk table after the 7 rows of the tensor table
        start = tl.load(table + 7 * n + n_chunks + pid) * CHUNK_SIZE
        ptrs = (table_ptr(table, 0, n, t, P_DT, ALIGNED), table_ptr(table, 1, n, t, G_DT, ALIGNED),
                table_ptr(table, 2, n, t, tl.float32, ALIGNED),
                table_ptr(table, 3, n, t, ACC, ALIGNED))
        step_ptr = tl.load(table + 4 * n + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(table + 5 * n + t)
        key = sr_key(rng_state, tl.load(table + 6 * n + t), STOCHASTIC)
        first = tl.load(step_ptr) == 0
        sc = (grad_multiplier(inv_scale, ACC, HAS_INV), f64(hyper[1]).to(ACC), f64(hyper[2]).to(ACC),
              f64(hyper[3]).to(ACC), (-lr_of(lr_tensor, hyper[0], HAS_LR_TENSOR)).to(ACC), key)
        for base in range(start, start + CHUNK_SIZE, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            if ALIGNED:
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
            mask = offs < numel
            if base + BLOCK <= numel:
                _sgd_block(offs, mask, ptrs, sc, first, P_DT, P_BF16, G_BF16, ACC, HAS_MASTER,
                           HAS_INV, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, STOCHASTIC, False)
            elif base < numel:
                _sgd_block(offs, mask, ptrs, sc, first, P_DT, P_BF16, G_BF16, ACC, HAS_MASTER,
                           HAS_INV, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, STOCHASTIC, True)


# ------------------------------------------------------------------ step counters
@triton.jit(do_not_specialize=["n"])
def count_step_kernel(steps_table, n, found_inf, rng_state, HAS_FOUND_INF: tl.constexpr,
                       ADVANCE_RNG: tl.constexpr, BLOCK: tl.constexpr):
    """steps[i] += count[i] and rng counter += 1, after every update read them; if applied."""
    if applied(found_inf, HAS_FOUND_INF):
        for base in range(0, n, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            ptrs = tl.load(steps_table + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
            count = tl.load(steps_table + n + offs, mask=mask, other=0).to(tl.float32)
            tl.store(ptrs, tl.load(ptrs, mask=mask) + count, mask=mask)
        if ADVANCE_RNG:
            tl.store(rng_state + 1, tl.load(rng_state + 1) + 1)
