"""Triton backend of ``adam_step_compact_`` (Adam / AdamW with compact moments).

A plain launcher with the reference's signature (:mod:`amp_engine.ops.reference.moments8`),
so tests can call it on CPU tensors under ``TRITON_INTERPRET=1``. One launch per
(param, grad, exp_avg, exp_avg_sq dtype) group; tensors reach the kernel through
an int64 address table (cached like triton.optim's), one program per chunk of one
tensor; then triton.optim's one-program kernel bumps the step counters, on the
device and only when the step was applied.
"""
from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine.ops import moments8
from amp_engine.ops.triton.moments8_kernels import BF16, F32, Q8, adam_compact_kernel
from amp_engine.ops.triton.optim import STORAGE, acc_bits, bits_of, device_table
from amp_engine.ops.triton.optim_kernels import count_step_kernel

CHUNK = 8192  # a multiple of the 256-element block: no block spans two programs
_NB = {"cuda": 4}  # blocks per tile (rows of 256)
_NB_DEFAULT = 32
_FMT = {torch.float32: F32, torch.bfloat16: BF16, torch.uint8: Q8}


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _format_constants(em: tuple[int, int], prefix: str) -> dict[str, int]:
    e_bits, m_bits = em
    bias = (1 << e_bits) - 1
    return {f"{prefix}_BIAS": bias, f"{prefix}_M": m_bits,
            f"{prefix}_MAXCODE": (1 << (e_bits + m_bits)) - 1,
            f"{prefix}_MAXVAL": _f32_bits(moments8.maxval(em)),
            f"{prefix}_MAGIC": _f32_bits(2.0 ** (24 - bias - m_bits)),
            f"{prefix}_MINNORM": _f32_bits(2.0 ** (1 - bias))}


_CONSTANTS = {**_format_constants(moments8.SIGNED_EM, "S"),
              **_format_constants(moments8.UNSIGNED_EM, "U")}


def adam_step_compact_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    exp_avg_absmax: Sequence[Tensor], exp_avg_sq_absmax: Sequence[Tensor],
    steps: Sequence[Tensor], lr_tensor: Tensor | None, lr: float, inv_scale: Tensor | None,
    found_inf: Tensor | None, rng_state: Tensor | None, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, maximize: bool, stochastic_rounding: bool,
) -> None:
    """Arguments as ``reference.moments8.adam_step_compact_`` (trusted: the op entry checks)."""
    if len(params) == 0:
        return
    if stochastic_rounding and rng_state is None and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("stochastic_rounding=True needs rng_state (int64 [seed, counter])")
    device = params[0].device
    writeback, groups = [], {}
    for i, p in enumerate(params):
        row = [p, grads[i], masters[i] if len(masters) else None, exp_avgs[i], exp_avg_sqs[i]]
        if not all(t is None or t.is_contiguous() for t in row):
            copies = [None if t is None else t.contiguous() for t in row]
            writeback += [(t, c) for r, (t, c) in enumerate(zip(row, copies))
                          if r != 1 and t is not None and c is not t]
            row = copies
        row += [exp_avg_absmax[i] if exp_avgs[i].dtype == torch.uint8 else None,
                exp_avg_sq_absmax[i] if exp_avg_sqs[i].dtype == torch.uint8 else None]
        key = (p.dtype, grads[i].dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype)
        groups.setdefault(key, []).append((i, row))

    flat, launches = [], []
    for key, members in groups.items():
        n = len(members)
        table = [0] * (10 * n)
        chunk_t, chunk_c = [], []
        for t, (i, row) in enumerate(members):
            for r, x in enumerate(row):
                if x is not None and x.numel():
                    table[r * n + t] = x.data_ptr()
            numel = row[0].numel()
            table[7 * n + t] = steps[i].data_ptr()
            table[8 * n + t] = numel
            table[9 * n + t] = i
            n_chunk = -(-numel // CHUNK)
            chunk_t += [t] * n_chunk
            chunk_c += range(n_chunk)
        launches.append((len(flat), len(table) + 2 * len(chunk_t), n, len(chunk_t), key))
        flat += table + chunk_t + chunk_c
    counts: dict[int, int] = {}
    for s in steps:  # a counter listed twice counts twice, as in the reference
        counts[s.data_ptr()] = counts.get(s.data_ptr(), 0) + 1
    steps_at = len(flat)
    flat += list(counts) + list(counts.values())
    buf = device_table(flat, device)
    common = (found_inf if found_inf is not None else buf,
              inv_scale if inv_scale is not None else buf,
              lr_tensor if lr_tensor is not None else buf,
              rng_state if rng_state is not None else buf)
    f32 = torch.float32
    hyper = (bits_of(lr), bits_of(beta1), bits_of(beta2), bits_of(weight_decay),
             acc_bits(1.0 - beta1, f32), acc_bits(beta2, f32), acc_bits(1.0 - beta2, f32),
             acc_bits(eps, f32), acc_bits(weight_decay, f32))
    tables = (moments8.decode_table_tensor(True, device), moments8.decode_table_tensor(False, device))
    nb = _NB.get(device.type, _NB_DEFAULT)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for at, size, n, n_chunks, (p_dt, g_dt, m_dt, v_dt) in launches:
            if n_chunks == 0:
                continue
            adam_compact_kernel[(n_chunks,)](
                buf[at:at + size], n, n_chunks, *common, hyper, *tables,
                P_DT=STORAGE[p_dt], G_DT=STORAGE[g_dt], P_BF16=p_dt == torch.bfloat16,
                G_BF16=g_dt == torch.bfloat16, M_FMT=_FMT[m_dt], V_FMT=_FMT[v_dt],
                HAS_MASTER=len(masters) > 0, HAS_INV=inv_scale is not None,
                HAS_FOUND_INF=found_inf is not None, HAS_LR_TENSOR=lr_tensor is not None,
                HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
                LERP_SMALL=moments8.f32(1.0 - beta1) < 0.5,
                STOCHASTIC=bool(stochastic_rounding) and p_dt == torch.bfloat16,
                NB=nb, CHUNK_SIZE=CHUNK, **_CONSTANTS, num_warps=4, enable_fp_fusion=False)
        count_step_kernel[(1,)](
            buf[steps_at:], len(counts), common[0], common[3],
            HAS_FOUND_INF=found_inf is not None,
            ADVANCE_RNG=bool(stochastic_rounding) and rng_state is not None, BLOCK=256)
    for original, copy in writeback:
        original.copy_(copy)
