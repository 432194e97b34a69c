"""Triton backend of the fused optimizer steps ``adam_step_`` and ``sgd_step_``.

Plain launcher functions with the reference's signatures (the arithmetic contract:
:mod:`amp_engine.ops.reference.optim`; the kernels: ``triton_optim_kernels``). One
launch per (param dtype, grad dtype) group over the whole list: the tensors'
addresses go to the kernel in an int64 pointer table (cached, so a steady training
loop copies none), one program per chunk of one tensor. A last one-program launch
adds 1 to the step counters (and the rng counter) after every update has read
them, and only when the step was applied, decided on the device.
"""
from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Sequence

import torch
import triton.language as tl
from torch import Tensor

from amp_engine.ops.reference.optim import walks_memory
from amp_engine.ops.triton.optim_kernels import adam_kernel, count_step_kernel, sgd_kernel
from amp_engine.ops.triton.tables import LaunchTables

# Elements per program (CHUNK) and per loop step (BLOCK). The interpreter runs
# programs one by one in numpy, so there wider blocks only cut Python overhead.
CHUNK = 16384
_BLOCK = {"cuda": 1024}
_BLOCK_DEFAULT = 4096

# ------------------------------------------------------------------ host side
STORAGE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.uint16,
            torch.float64: tl.float64}
#: pointer tables by content: a steady training loop copies none; a table a CUDA
#: graph captured is pinned, never evicted (see ops.triton.tables)
TABLES: LaunchTables[Tensor] = LaunchTables("optimizer steps", capacity=16)


def bits_of(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def acc_bits(x: float, acc: torch.dtype) -> int:
    """Bits of x rounded to the accumulation dtype, as ``torch.tensor(x, dtype=acc)``."""
    return bits_of(_f32(x) if acc == torch.float32 else x)


def _f32(x: float) -> float:
    """x rounded to the nearest fp32 (overflow to inf), as ``numpy.float32(x)``; struct
    rather than numpy: the GPU machine may have no numpy, and this runs every step."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # beyond fp32's range (pack refuses; the rounding gives inf)
        return math.copysign(math.inf, x)


def device_table(flat: list[int], device: torch.device) -> Tensor:
    def build() -> Tensor:
        host = torch.tensor(flat, dtype=torch.int64)
        if device.type == "cuda":  # pinned + non_blocking: the host does not wait for the GPU
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    return TABLES.get((device, tuple(flat)), device, build)


def _walkable(tensors: list[Tensor | None], mutated: Sequence[int]):
    """Tensors the kernel can walk as flat memory, and (original, copy) pairs to copy back."""
    if walks_memory([t for t in tensors if t is not None]):
        return tensors, []
    copies = [None if t is None else t.contiguous() for t in tensors]
    back = [(tensors[r], copies[r]) for r in mutated if tensors[r] is not None]
    return copies, [(t, c) for t, c in back if c is not t]


def _launch(kernel, rows: list[list[Tensor | None]], mutated: Sequence[int], steps, found_inf,
            inv_scale, lr_tensor, rng_state, advance_rng: bool, hyper, flags) -> None:
    """Group by (param, grad) dtype, build the tables, launch, count the step, copy back.

    rows[i]: tensor i's pointer rows (param, grad, master, state...; None = absent).
    flags(p_dtype, acc_dtype) -> the group's constexpr flags beyond the dtypes; hyper(acc_dtype)
    -> the fp64 bit patterns the kernel reads (see the kernels).
    """
    device = rows[0][0].device
    writeback, groups = [], {}
    for i, tensors in enumerate(rows):
        tensors, back = _walkable(tensors, mutated)
        writeback += back
        groups.setdefault((tensors[0].dtype, tensors[1].dtype), []).append((i, tensors))
    flat, launches = [], []
    for (p_dtype, g_dtype), members in groups.items():
        n = len(members)
        n_rows = len(members[0][1]) + 3
        table = [0] * (n_rows * n)
        chunk_t, chunk_c = [], []
        aligned = True
        for t, (i, tensors) in enumerate(members):
            for r, x in enumerate(tensors):
                if x is not None:
                    table[r * n + t] = x.data_ptr()
                    aligned &= x.data_ptr() % 16 == 0
            numel = tensors[0].numel()
            table[(n_rows - 3) * n + t] = steps[i].data_ptr()
            table[(n_rows - 2) * n + t] = numel
            table[(n_rows - 1) * n + t] = i  # the index in the call: stochastic-rounding key
            n_chunk = -(-numel // CHUNK)
            chunk_t += [t] * n_chunk
            chunk_c += range(n_chunk)
        launches.append((len(flat), len(table) + 2 * len(chunk_t), n, len(chunk_t), p_dtype,
                         g_dtype, aligned))
        flat += table + chunk_t + chunk_c
    counts: dict[int, int] = {}
    for s in steps:  # one tensor listed twice counts twice, as in the reference
        counts[s.data_ptr()] = counts.get(s.data_ptr(), 0) + 1
    steps_at = len(flat)
    flat += list(counts) + list(counts.values())
    buf = device_table(flat, device)
    dummy = buf
    common = (found_inf if found_inf is not None else dummy,
              inv_scale if inv_scale is not None else dummy,
              lr_tensor if lr_tensor is not None else dummy,
              rng_state if rng_state is not None else dummy)
    block = _BLOCK.get(device.type, _BLOCK_DEFAULT)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for at, size, n, n_chunks, p_dtype, g_dtype, aligned in launches:
            if n_chunks == 0:
                continue
            acc = torch.float64 if p_dtype == torch.float64 else torch.float32
            kernel[(n_chunks,)](
                buf[at:at + size], n, n_chunks, *common, hyper(acc),
                P_DT=STORAGE[p_dtype], G_DT=STORAGE[g_dtype],
                P_BF16=p_dtype == torch.bfloat16, G_BF16=g_dtype == torch.bfloat16,
                ACC=STORAGE[acc], HAS_FOUND_INF=found_inf is not None,
                HAS_INV=inv_scale is not None, HAS_LR_TENSOR=lr_tensor is not None,
                ALIGNED=aligned, BLOCK=block, CHUNK_SIZE=CHUNK, **flags(p_dtype, acc),
                num_warps=4, enable_fp_fusion=False)
        count_step_kernel[(1,)](
            buf[steps_at:], len(counts), common[0], common[3],
            HAS_FOUND_INF=found_inf is not None, ADVANCE_RNG=advance_rng, BLOCK=256)
    for original, copy in writeback:
        original.copy_(copy)


def _check_rng(params, rng_state, stochastic_rounding) -> None:
    if stochastic_rounding and rng_state is None and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("stochastic_rounding=True needs rng_state (int64 [seed, counter])")


def adam_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor], lr_tensor: Tensor | None, lr: float, inv_scale: Tensor | None,
    found_inf: Tensor | None, rng_state: Tensor | None, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
    stochastic_rounding: bool,
) -> None:
    """Adam / AdamW step on one device, arguments as ``optim_reference.adam_step_``.

    params fp32/fp16/bf16/fp64 (any shapes), grads any of those dtypes, masters [] or
    fp32, moments fp32 (fp64 for fp64 params), steps one-element fp32; all on the
    params' device (CUDA, or CPU under TRITON_INTERPRET=1). Arguments are trusted:
    ``amp_engine.ops.adam_step_`` checks them.
    """
    if len(params) == 0:
        return
    _check_rng(params, rng_state, stochastic_rounding)
    rows = [[p, grads[i], masters[i] if len(masters) else None, exp_avgs[i], exp_avg_sqs[i],
             max_exp_avg_sqs[i] if amsgrad else None] for i, p in enumerate(params)]

    def hyper(acc):
        return (bits_of(lr), bits_of(beta1), bits_of(beta2), bits_of(weight_decay),
                acc_bits(1.0 - beta1, acc), acc_bits(beta2, acc), acc_bits(1.0 - beta2, acc),
                acc_bits(eps, acc), acc_bits(weight_decay, acc))

    def flags(p_dtype, acc):
        w1 = _f32(1.0 - beta1) if acc == torch.float32 else 1.0 - beta1
        return dict(IS_F64=acc == torch.float64, HAS_MASTER=len(masters) > 0,
                    HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad),
                    MAXIMIZE=bool(maximize), LERP_SMALL=w1 < 0.5,
                    STOCHASTIC=bool(stochastic_rounding) and p_dtype == torch.bfloat16)

    _launch(adam_kernel, rows, (0, 2, 3, 4, 5), steps, found_inf, inv_scale, lr_tensor,
            rng_state, bool(stochastic_rounding) and rng_state is not None, hyper, flags)


def sgd_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor], steps: Sequence[Tensor], lr_tensor: Tensor | None,
    lr: float, inv_scale: Tensor | None, found_inf: Tensor | None, rng_state: Tensor | None,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    stochastic_rounding: bool,
) -> None:
    """SGD step on one device, arguments as ``optim_reference.sgd_step_`` (see adam_step_)."""
    if len(params) == 0:
        return
    _check_rng(params, rng_state, stochastic_rounding)
    rows = [[p, grads[i], masters[i] if len(masters) else None,
             momentum_buffers[i] if momentum != 0 else None] for i, p in enumerate(params)]

    def hyper(acc):
        return (bits_of(lr), acc_bits(weight_decay, acc), acc_bits(momentum, acc),
                acc_bits(1.0 - dampening, acc))

    def flags(p_dtype, acc):
        return dict(HAS_MASTER=len(masters) > 0, HAS_WD=weight_decay != 0,
                    HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                    STOCHASTIC=bool(stochastic_rounding) and p_dtype == torch.bfloat16)

    _launch(sgd_kernel, rows, (0, 2, 3), steps, found_inf, inv_scale, lr_tensor, rng_state,
            bool(stochastic_rounding) and rng_state is not None, hyper, flags)
