"""Triton kernel of ``adam_step_compact_`` (launched by :mod:`amp_engine.ops.triton.moments8`).

Arithmetic: exactly :mod:`amp_engine.ops.reference.moments8` (encode/decode:
:mod:`amp_engine.ops.moments8`), with the traps of triton.optim_kernels avoided
the same way: no fused multiply-adds, ``div_rn``/``sqrt_rn``, bf16 handled as
uint16 bits with integer rounding, fp64 hyper-parameters as int64 bits, NaN
tested as ``x != x`` (``tl.max`` drops NaN: the block absmax adds it back).

A tile is ``NB`` rows of one 256-element block each, so the new absmax of every
block is a row reduction in registers: the moments are decoded, updated and
re-encoded in the same pass that reads the grad. Tensor table (int64, ``n``
columns): param, grad, master, exp_avg, exp_avg_sq, their absmax, the step
counter's address, numel, the tensor's index; then the chunk table as in
triton.optim_kernels. Moment formats (constexpr): 0 fp32, 1 bf16, 2 uint8 blocks.
"""
import triton
import triton.language as tl

from amp_engine.ops.triton.optim_kernels import (
    applied, f64, grad_multiplier, load_acc, lr_of, pow_f64, sr_key, store_param, table_ptr,
)

F32, BF16, Q8 = 0, 1, 2


@triton.jit
def _f32_from_bits(bits: tl.constexpr):
    return tl.full([], bits, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_moment(ptr, abs_ptr, offs, mask, blk, bmask, table, FMT: tl.constexpr):
    if FMT == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    elif FMT == 1:
        x = tl.load(ptr + offs, mask=mask, other=0)
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        code = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(abs_ptr + blk, mask=bmask, other=0.0)
        return tl.load(table + code) * absmax[:, None]


@triton.jit
def _encode_magnitude(t, BIAS: tl.constexpr, M: tl.constexpr, MAXCODE: tl.constexpr,
                      MAGIC_BITS: tl.constexpr, MIN_NORMAL_BITS: tl.constexpr):
    """fp32 t >= 0 -> nearest code, ties to even, saturating (moments8.encode_magnitude)."""
    SHIFT: tl.constexpr = 23 - M
    u = t.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    normal = u - ((127 - BIAS) << 23)
    normal = (normal + ((1 << (SHIFT - 1)) - 1) + ((normal >> SHIFT) & 1)) >> SHIFT
    magic = _f32_from_bits(MAGIC_BITS)
    sub = (t + magic).to(tl.int32, bitcast=True) - MAGIC_BITS
    code = tl.where(t < _f32_from_bits(MIN_NORMAL_BITS), sub, normal)
    return tl.minimum(code, MAXCODE)


@triton.jit
def _store_moment(ptr, abs_ptr, offs, mask, blk, bmask, x, FMT: tl.constexpr,
                  SIGNED: tl.constexpr, BIAS: tl.constexpr, M: tl.constexpr,
                  MAXCODE: tl.constexpr, MAXVAL_BITS: tl.constexpr, MAGIC_BITS: tl.constexpr,
                  MIN_NORMAL_BITS: tl.constexpr):
    if FMT == 0:
        tl.store(ptr + offs, x, mask=mask)
    elif FMT == 1:  # nearest even, as torch's fp32 -> bf16 cast
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        up = tl.where(x != x, tl.full([], 0x7FC0, tl.uint32), up)
        tl.store(ptr + offs, up.to(tl.uint16), mask=mask)
    else:
        absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
        has_nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=1) > 0
        absmax = tl.where(has_nan, float("nan"), absmax)
        absmax = tl.where(absmax < 1.1754943508222875e-38, 0.0, absmax)  # below 2**-126: flush
        safe = tl.where(absmax > 0, absmax, 1.0)
        inv = tl.where(absmax > 0, tl.div_rn(tl.zeros_like(absmax) + _f32_from_bits(MAXVAL_BITS), safe), 0.0)
        code = _encode_magnitude(tl.abs(x) * inv[:, None], BIAS, M, MAXCODE, MAGIC_BITS,
                                 MIN_NORMAL_BITS)
        if SIGNED:
            code = code | tl.where(x.to(tl.int32, bitcast=True) < 0, 0x80, 0)
        tl.store(ptr + offs, code.to(tl.uint8), mask=mask)
        tl.store(abs_ptr + blk, absmax, mask=bmask)


@triton.jit
def _mom_ptr(table, row, n, t, FMT: tl.constexpr):
    if FMT == 0:
        return table_ptr(table, row, n, t, tl.float32, False)
    elif FMT == 1:
        return table_ptr(table, row, n, t, tl.uint16, False)
    else:
        return table_ptr(table, row, n, t, tl.uint8, False)


@triton.jit(do_not_specialize=["n", "n_chunks", "hyper"])
def adam_compact_kernel(
        table, n, n_chunks, found_inf, inv_scale, lr_tensor, rng_state, hyper, dec_signed,
        dec_unsigned, P_DT: tl.constexpr, G_DT: tl.constexpr, P_BF16: tl.constexpr,
        G_BF16: tl.constexpr, M_FMT: tl.constexpr, V_FMT: tl.constexpr,
        HAS_MASTER: tl.constexpr, HAS_INV: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        HAS_LR_TENSOR: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
        MAXIMIZE: tl.constexpr, LERP_SMALL: tl.constexpr, STOCHASTIC: tl.constexpr,
        S_BIAS: tl.constexpr, S_M: tl.constexpr, S_MAXCODE: tl.constexpr,
        S_MAXVAL: tl.constexpr, S_MAGIC: tl.constexpr, S_MINNORM: tl.constexpr,
        U_BIAS: tl.constexpr, U_M: tl.constexpr, U_MAXCODE: tl.constexpr,
        U_MAXVAL: tl.constexpr, U_MAGIC: tl.constexpr, U_MINNORM: tl.constexpr,
        NB: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    # hyper: fp64 bits of lr, beta1, beta2, wd, then fp32-rounded w1, beta2, 1-beta2, eps, wd
    if applied(found_inf, HAS_FOUND_INF):
        pid = tl.program_id(0)
        t = tl.load(table + 10 * n + pid)
        start = tl.load(table + 10 * n + n_chunks + pid) * CHUNK_SIZE
        p_ptr = table_ptr(table, 0, n, t, P_DT, False)
        g_ptr = table_ptr(table, 1, n, t, G_DT, False)
        w_ptr = table_ptr(table, 2, n, t, tl.float32, False)
        m_ptr = _mom_ptr(table, 3, n, t, M_FMT)
        v_ptr = _mom_ptr(table, 4, n, t, V_FMT)
        ma_ptr = table_ptr(table, 5, n, t, tl.float32, False)
        va_ptr = table_ptr(table, 6, n, t, tl.float32, False)
        step_ptr = tl.load(table + 7 * n + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(table + 8 * n + t)
        key = sr_key(rng_state, tl.load(table + 9 * n + t), STOCHASTIC)
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        lr = lr_of(lr_tensor, hyper[0], HAS_LR_TENSOR)
        bc1 = 1.0 - pow_f64(f64(hyper[1]), step)
        bc2_sqrt = tl.sqrt(1.0 - pow_f64(f64(hyper[2]), step)).to(tl.float32)
        neg_step = (-(lr / bc1)).to(tl.float32)
        decay = (1.0 - lr * f64(hyper[3])).to(tl.float32)
        inv = grad_multiplier(inv_scale, tl.float32, HAS_INV)
        w1 = f64(hyper[4]).to(tl.float32)
        beta2 = f64(hyper[5]).to(tl.float32)
        omb2 = f64(hyper[6]).to(tl.float32)
        eps = f64(hyper[7]).to(tl.float32)
        wd = f64(hyper[8]).to(tl.float32)
        rows = tl.arange(0, NB)
        cols = tl.arange(0, 256)
        for base in range(start, start + CHUNK_SIZE, NB * 256):
            if base < numel:
                blk = base // 256 + rows
                bmask = blk * 256 < numel
                offs = base + rows[:, None] * 256 + cols[None, :]
                mask = offs < numel
                g = load_acc(g_ptr, offs, mask, G_BF16, tl.float32, True)
                if HAS_INV:
                    g = g * inv
                if MAXIMIZE:
                    g = -g
                if HAS_MASTER:
                    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
                else:
                    w = load_acc(p_ptr, offs, mask, P_BF16, tl.float32, True)
                if HAS_WD:
                    if DECOUPLED:
                        w = w * decay
                    else:
                        g = g + wd * w
                m = _load_moment(m_ptr, ma_ptr, offs, mask, blk, bmask, dec_signed, M_FMT)
                if LERP_SMALL:
                    m = m + w1 * (g - m)
                else:
                    m = g - (g - m) * (1.0 - w1)
                v = _load_moment(v_ptr, va_ptr, offs, mask, blk, bmask, dec_unsigned, V_FMT)
                v = v * beta2 + (omb2 * g) * g
                denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
                w = w + tl.div_rn(neg_step * m, denom)
                _store_moment(m_ptr, ma_ptr, offs, mask, blk, bmask, m, M_FMT, True, S_BIAS,
                              S_M, S_MAXCODE, S_MAXVAL, S_MAGIC, S_MINNORM)
                _store_moment(v_ptr, va_ptr, offs, mask, blk, bmask, v, V_FMT, False, U_BIAS,
                              U_M, U_MAXCODE, U_MAXVAL, U_MAGIC, U_MINNORM)
                if HAS_MASTER:
                    tl.store(w_ptr + offs, w, mask=mask)
                store_param(p_ptr, offs, w, mask, key, P_DT, P_BF16, STOCHASTIC, True)
