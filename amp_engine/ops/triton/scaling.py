"""Triton kernels of the loss-scaling ops (CUDA; CPU tensors under TRITON_INTERPRET=1).

Plain launchers with the signatures of :mod:`amp_engine.ops.reference`; the caller
(:mod:`amp_engine.ops.scaling`) has validated the arguments.

Multi-tensor launch: a list of grads becomes one int64 table on the grads' device
(see :func:`_plan`) holding each tensor's data pointer, size and slot (its index in
the caller's list) and a chunk table (chunk -> tensor, offset). Each program
handles one chunk of ``BLOCK`` elements of one tensor, so a list of any length
costs one launch per dtype group, never one per tensor. Tables are cached by the
tensors' (pointer, size, dtype), so a training loop that passes the same grads
every step builds them and copies them to the device once, not every step (a
table a CUDA graph captured is pinned, never evicted: see ``ops.triton.tables``).

Numerics (the reference's contract, bit for bit): fp32/fp16/bf16 grads are
unscaled as ``float32(g) * inv_scale`` in fp32 and rounded to the grad's dtype at
the store; fp64 grads in fp64. An element is non-finite if it is before scaling
or its stored (rounded) value is. bf16 is handled as raw 16-bit patterns with an
explicit round-to-nearest-even: the interpreter's bf16 arithmetic is wrong and its
fp32->bf16 cast truncates, while the GPU rounds; the bit ops give the same answer
on both. Squares for the norm are summed in fp64 (no overflow for huge finite
grads, no underflow for tiny ones), per chunk then per tensor in a fixed order:
deterministic, no atomics on floats.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from amp_engine.ops.reference.scaling import DEFAULT_MIN_SCALE, clip_outputs_
from amp_engine.ops.triton.tables import LaunchTables

#: Elements per program (one chunk). Large enough that a GPU program streams
#: several vector loads per thread; small enough that the last, partial chunk of
#: a tensor wastes little. Tests lower it to cross chunk boundaries cheaply.
BLOCK = 4096
_NUM_WARPS = 8
#: Chunks one program of the per-tensor reduction reads per iteration.
_REDUCE_BLOCK = 256

# How a dtype group is loaded, computed and stored (a constexpr of the kernels).
_F32, _F16, _BF16, _F64 = 0, 1, 2, 3
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16, torch.float64: _F64}


# --------------------------------------------------------------------------- kernels
# Non-finite tests are written out as (x != x) | (|x| == inf): libdevice isinf/isnan
# do not run in the interpreter. Nested @triton.jit helpers are kept few: the
# interpreter pays ~2 ms per helper call per program.
@triton.jit
def _load_unscaled(base, offs, mask, inv_scale, KIND: tl.constexpr):
    """Load a chunk and unscale it.

    Returns (typed pointer, unscaled value in the compute type (0 where masked),
    value to store in the grad's storage type, non-finite flags (False where masked)).
    """
    inv = tl.load(inv_scale)
    if KIND == 0:
        p = base.to(tl.pointer_type(tl.float32))
        x = tl.load(p + offs, mask=mask, other=0.0)
        u = x * inv
        out = u
        after = u
    elif KIND == 1:
        p = base.to(tl.pointer_type(tl.float16))
        x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        u = x * inv
        out = u.to(tl.float16)  # round to nearest even, on the GPU and in numpy alike
        after = out.to(tl.float32)
    elif KIND == 2:
        # bf16 as raw bits: widening is a shift, exact everywhere; narrowing is an
        # explicit round to nearest even (the interpreter's cast truncates)
        p = base.to(tl.pointer_type(tl.uint16))
        x = (tl.load(p + offs, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        u = x * inv
        bits = u.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # a NaN with only low mantissa bits would round to inf: keep sign, force quiet
        rounded = tl.where(u != u, (bits >> 16) | 0x40, rounded)
        out = rounded.to(tl.uint16)
        after = (rounded << 16).to(tl.float32, bitcast=True)
    else:
        p = base.to(tl.pointer_type(tl.float64))
        x = tl.load(p + offs, mask=mask, other=0.0)
        u = x * inv.to(tl.float64)
        out = u
        after = u
    bad = (x != x) | (tl.abs(x) == float("inf")) | (after != after) | (tl.abs(after) == float("inf"))
    # masked lanes hold 0 * inv, which is NaN when inv_scale is inf: never count them
    return p, tl.where(mask, u, 0.0), out, bad & mask


@triton.jit(do_not_specialize=["n", "n_chunks", "chunk_base"])
def _check_kernel(meta, n, n_chunks, chunk_base, inv_scale, found_inf, counts, sumsq_ws,
                  UNSCALE: tl.constexpr, HAS_COUNTS: tl.constexpr, KIND: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One chunk: unscale in place (UNSCALE) or sum its squares into sumsq_ws[chunk].

    ``meta`` layout: see _build_plan. found_inf/counts as in the reference.
    """
    c = chunk_base + tl.program_id(0)
    pos = tl.load(meta + 3 * n + c)
    offs = tl.load(meta + 3 * n + n_chunks + c) + tl.arange(0, BLOCK)
    mask = offs < tl.load(meta + n + pos)
    p, u, out, bad = _load_unscaled(tl.load(meta + pos), offs, mask, inv_scale, KIND)
    if UNSCALE:
        tl.store(p + offs, out, mask=mask)
    else:
        u64 = u.to(tl.float64)
        tl.store(sumsq_ws + c, tl.sum(u64 * u64))
    n_bad = tl.sum(tl.where(bad, 1, 0).to(tl.int64))
    # only ever 1.0 is written, so concurrent programs cannot undo each other
    tl.store(found_inf, 1.0, mask=n_bad > 0)
    if HAS_COUNTS:
        tl.atomic_add(counts + tl.load(meta + 2 * n + pos), n_bad, mask=n_bad > 0)


@triton.jit(do_not_specialize=["n", "n_chunks"])
def _reduce_kernel(meta, n, n_chunks, sumsq_ws, sumsq, R: tl.constexpr):
    """sumsq[slot] = sum of the slot's chunk partials, always in the same order."""
    slot = tl.program_id(0)
    first = tl.load(meta + 3 * n + 2 * n_chunks + slot)
    count = tl.load(meta + 4 * n + 2 * n_chunks + slot)
    acc = tl.zeros([R], tl.float64)
    for k in range(0, count, R):
        idx = k + tl.arange(0, R)
        acc += tl.load(sumsq_ws + first + idx, mask=idx < count, other=0.0)
    tl.store(sumsq + slot, tl.sum(acc))


@triton.jit(do_not_specialize=["n_counts", "rows"])
def _update_scale_kernel(scale, growth_tracker, hysteresis_tracker, found_inf,
                         growth_factor: tl.float64, backoff_factor: tl.float64,
                         growth_interval: tl.int64, hysteresis: tl.int32,
                         min_scale: tl.float32, max_scale: tl.float32,
                         inv_scale, next_found_inf, counters, counts, ring, n_counts, rows,
                         HAS_INV: tl.constexpr, HAS_NEXT: tl.constexpr,
                         HAS_COUNTERS: tl.constexpr, HAS_RING: tl.constexpr,
                         RBLOCK: tl.constexpr):
    """reference.update_scale_ (and after_update_) in one program: the factors are
    fp64 arguments, the bounds already rounded to fp32 (as the reference's fp32
    clamps see them)."""
    s = tl.load(scale)
    gt = tl.load(growth_tracker)
    ht = tl.load(hysteresis_tracker)
    f = tl.load(found_inf)
    overflow = f != 0.0  # a flag, not == 1: NaN and sums over devices count too
    clean = f == 0.0

    backoff = overflow & (ht - 1 <= 0)
    # torch multiplies in fp64 and rounds to fp32; clamp_min keeps a NaN scale NaN
    backed = (s.to(tl.float64) * backoff_factor).to(tl.float32)
    backed = tl.where(backed < min_scale, min_scale, backed)

    successful = gt + 1
    grow = clean & (successful.to(tl.int64) >= growth_interval)
    grown = (s.to(tl.float64) * growth_factor).to(tl.float32)
    grown_ok = (grown == grown) & (tl.abs(grown) != float("inf"))
    grown = tl.where(grown_ok, tl.where(grown > max_scale, max_scale, grown), s)

    new_s = tl.where(backoff, backed, tl.where(grow, grown, s))
    tl.store(scale, new_s)
    tl.store(growth_tracker, tl.where(overflow | grow, 0, successful))
    tl.store(hysteresis_tracker, tl.where(overflow, tl.maximum(ht - 1, 0), hysteresis))
    if HAS_INV:  # torch's fp64 reciprocal, rounded to fp32
        tl.store(inv_scale, (1.0 / new_s.to(tl.float64)).to(tl.float32))
    if HAS_NEXT:
        tl.store(next_found_inf, 0.0)
    if HAS_COUNTERS:
        u = tl.load(counters)
        events = tl.load(counters + 1)
        if HAS_RING:
            row = ring + (events % rows) * (n_counts + 1)
            tl.store(row, u)
            for start in range(0, n_counts, RBLOCK):
                offs = start + tl.arange(0, RBLOCK)
                mask = offs < n_counts
                tl.store(row + 1 + offs, tl.load(counts + offs, mask=mask), mask=mask)
        tl.store(counters + 1, events + tl.where(overflow, 1, 0).to(tl.int64))
        last = tl.load(counters + 2)
        tl.store(counters + 2, tl.where(new_s > min_scale, u, last))
        tl.store(counters, u + 1)


# --------------------------------------------------------------------------- host side
class _Plan(NamedTuple):
    meta: Tensor  # int64 on the grads' device, layout in _build_plan
    n: int
    n_chunks: int
    groups: tuple[tuple[int, int, int], ...]  # (kind, first chunk, number of chunks)


#: launch tables by layout; see ops.triton.tables for what CUDA graph capture does to them
TABLES: LaunchTables[_Plan] = LaunchTables("loss-scaling ops", capacity=32)


def _plan(tensors: Sequence[Tensor], device: torch.device) -> _Plan:
    """The launch tables of `tensors` (dense, one device); cached by their layout."""
    key = (device, BLOCK, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    return TABLES.get(key, device, lambda: _build_plan(key[2], device, BLOCK))


def _build_plan(key: tuple, device: torch.device, block: int) -> _Plan:
    """Builds ``meta`` (int64) = [ptr | numel | slot] (n each, in dtype-group order),
    [chunk pos | chunk start] (n_chunks each; pos indexes the first part),
    [first chunk | number of chunks] (n each, by slot).

    Host metadata only (pointers and sizes), so no device sync; one pinned,
    non-blocking copy to the device.
    """
    n = len(key)
    order = sorted(range(n), key=lambda i: _KIND[key[i][2]])  # stable: slots ascend in a group
    ptrs = [key[i][0] for i in order]
    numels = [key[i][1] for i in order]
    chunks = [-(-m // block) for m in numels]
    first, counts_by_slot, groups, c = [0] * n, [0] * n, [], 0
    for j, i in enumerate(order):
        kind = _KIND[key[i][2]]
        if not groups or groups[-1][0] != kind:
            groups.append([kind, c, 0])
        first[i], counts_by_slot[i] = c, chunks[j]
        c += chunks[j]
        groups[-1][2] += chunks[j]
    # plain Python lists, one torch.tensor: tiny torch CPU ops can wait on a busy
    # thread pool, and numpy is optional (the GPU machine may have none)
    pos = list(itertools.chain.from_iterable(itertools.repeat(j, m) for j, m in enumerate(chunks)))
    start = [k * block for m in chunks for k in range(m)]
    meta = torch.tensor(ptrs + numels + order + pos + start + first + counts_by_slot, dtype=torch.int64)
    if device.type != "cpu":
        # pinned + non_blocking: no wait on the host; torch keeps the pinned block
        # alive until the copy has run
        meta = meta.pin_memory().to(device, non_blocking=True)
    return _Plan(meta, n, c, tuple((k, b, m) for k, b, m in groups if m > 0))


def _is_flat(t: Tensor) -> bool:
    """True if `t` covers a gap-free, non-overlapping block of memory in some dim order."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(grads: Sequence[Tensor]) -> list[Tensor]:
    """Kernels walk memory flat: right for any non-overlapping dense layout
    (permuted strides too); other views get a contiguous temporary (copied back
    by the in-place op, mirroring csrc/checks.h make_dense/copy_back)."""
    return [g if _is_flat(g) else g.contiguous() for g in grads]


def _launching_on(device: torch.device):
    """Triton launches on the current device: make it the tensors' one. On the CPU
    (interpreter), numpy would warn about the inf/NaN arithmetic the kernels exist
    to detect; silence that."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "cpu":  # only under the interpreter, which runs on numpy
        import numpy as np

        return np.errstate(over="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _launch_checks(plan, inv_scale, found_inf, counts, sumsq_ws, unscale: bool) -> None:
    has_counts = counts is not None
    for kind, chunk_base, n_chunks in plan.groups:
        _check_kernel[(n_chunks,)](
            plan.meta, plan.n, plan.n_chunks, chunk_base, inv_scale, found_inf,
            counts if has_counts else found_inf, sumsq_ws if sumsq_ws is not None else found_inf,
            UNSCALE=unscale, HAS_COUNTS=has_counts, KIND=kind, BLOCK=BLOCK,
            num_warps=_NUM_WARPS,
        )


def unscale_and_check_(
    grads: Sequence[Tensor], inv_scale: Tensor, found_inf: Tensor, counts: Tensor | None = None
) -> None:
    """grads *= inv_scale in place, in one launch per dtype group; see reference.unscale_and_check_.

    grads: fp32/fp16/bf16/fp64 tensors on one device (any layout, 0-size too);
    inv_scale, found_inf: one-element fp32; counts: int64 [len(grads)] or None.
    """
    if not grads:
        return
    dense = _dense(grads)
    with _launching_on(found_inf.device):
        _launch_checks(_plan(dense, found_inf.device), inv_scale, found_inf, counts, None, True)
    for g, d in zip(grads, dense):
        if d is not g:
            g.copy_(d)


def grad_norm_and_check(
    grads: Sequence[Tensor],
    inv_scale: Tensor,
    found_inf: Tensor,
    counts: Tensor | None = None,
    per_tensor: bool = False,
    max_norm: float | None = None,
    clip_coef: Tensor | None = None,
    step_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """L2 norm of the unscaled grads (read-only) and the inf check; see reference.

    Returns (total fp32 0-dim, per-tensor fp32 [len(grads)] or [0]) on found_inf's device.
    """
    device = found_inf.device
    sumsq = torch.zeros(len(grads), dtype=torch.float64, device=device)
    if grads:
        dense = _dense(grads)  # temporaries must outlive the launches
        plan = _plan(dense, device)
        if plan.n_chunks > 0:
            ws = torch.empty(plan.n_chunks, dtype=torch.float64, device=device)
            with _launching_on(device):
                _launch_checks(plan, inv_scale, found_inf, counts, ws, False)
                _reduce_kernel[(plan.n,)](plan.meta, plan.n, plan.n_chunks, ws, sumsq,
                                          R=_REDUCE_BLOCK, num_warps=4)
    total = sumsq.sum().sqrt().float()
    per = sumsq.sqrt().float() if per_tensor else sumsq.new_empty(0, dtype=torch.float32)
    clip_outputs_(total, inv_scale, max_norm, clip_coef, step_scale)  # 0-dim torch ops
    return total, per


def _to_f32(x: float) -> float:
    # the reference clamps with fp32 bounds; rounding here (overflow -> inf) keeps
    # the kernel argument exact and the interpreter free of overflow warnings
    return torch.tensor(x, dtype=torch.float32).item()


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    hysteresis_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = DEFAULT_MIN_SCALE,
    max_scale: float = float("inf"),
    inv_scale: Tensor | None = None,
    next_found_inf: Tensor | None = None,
    counters: Tensor | None = None,
    counts: Tensor | None = None,
    ring: Tensor | None = None,
) -> None:
    """One-program scale update on the scale's device; see reference.update_scale_.

    scale fp32, growth_tracker and hysteresis_tracker int32, found_inf fp32: one-element;
    the optional bookkeeping outputs as reference.after_update_.
    """
    dummy = scale  # stands in for an absent pointer argument (never read)
    with _launching_on(scale.device):
        _update_scale_kernel[(1,)](
            scale, growth_tracker, hysteresis_tracker, found_inf, float(growth_factor),
            float(backoff_factor), int(growth_interval), int(hysteresis), _to_f32(min_scale),
            _to_f32(max_scale),
            dummy if inv_scale is None else inv_scale,
            dummy if next_found_inf is None else next_found_inf,
            dummy if counters is None else counters,
            dummy if counts is None else counts,
            dummy if ring is None else ring,
            0 if counts is None else counts.shape[0], 1 if ring is None else ring.shape[0],
            HAS_INV=inv_scale is not None, HAS_NEXT=next_found_inf is not None,
            HAS_COUNTERS=counters is not None, HAS_RING=ring is not None,
            RBLOCK=256, num_warps=1,
        )
