"""The scaler's per-optimizer view of its grads: cached param lists, one list per device.

torch's GradScaler walks ``param_groups`` every step and buckets every grad by
(device, dtype) in Python: ≈1.2 µs per parameter. Here the walk happens once
per optimizer (and again only if its param groups change): the params are kept
grouped by device (a grad always lives on its param's device), and each step
costs one ``p.grad`` read per param plus one op call per device. Dtypes are not
bucketed: each op takes a mixed-dtype list.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from amp_engine import distributed
from amp_engine.scaler.stats import AmpStats

def _param_lists(optimizer) -> tuple[list, tuple[int, ...]]:
    """The param groups' lists and their lengths: what a cached entry is checked against."""
    lists = [g["params"] for g in optimizer.param_groups]
    return lists, tuple(len(x) for x in lists)


def _to_device(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor on ``device`` without a host sync (pinned, non-blocking copy on CUDA)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _present_grads(params: list[Tensor]) -> list[Tensor]:
    """The grads that are not None, in one pass (eager only: torch.compile cannot
    trace the walrus's cell, so compiled code takes the two-list spelling)."""
    return [g for p in params if (g := p.grad) is not None]


class DeviceGrads:
    """The params of one optimizer that live on one device, and their counts columns."""

    __slots__ = ("device", "params", "cols", "col_start", "_index", "_view")
    # _index: (columns, int64 index tensor on the stats device) of the last present-grads
    # pattern; patterns rarely change, so the index is rarely rebuilt (a host->device copy)

    def __init__(self, device: torch.device, params: list[Tensor], cols: list[int]) -> None:
        self.device = device
        self.params = params
        self.cols = cols
        start = cols[0] if cols else 0
        # a contiguous column range lets the kernels add into a view of the counts
        self.col_start = start if cols == list(range(start, start + len(cols))) else None
        self._index = None
        self._view = (None, None)  # (the counts tensor it views, the view)

    def grads(self, dtensor: bool) -> tuple[list[Tensor], list[int] | None]:
        """The present grads (dense, local shards) and, if some are None, their columns."""
        # ~100 ns per param: this read is the whole per-param Python cost of a step
        if torch.compiler.is_compiling():
            every = [p.grad for p in self.params]
            present = [g for g in every if g is not None]
        else:
            present = _present_grads(self.params)
        cols = None
        if len(present) != len(self.params):
            cols = [c for c, p in zip(self.cols, self.params) if p.grad is not None]
        if dtensor:
            present = [distributed.local_tensor(g) for g in present]
        return present, cols

    def grads_slow(self, dtensor: bool) -> tuple[list[Tensor], list[int], bool]:
        """Like :meth:`grads` but handles sparse grads as torch does.

        fp16 sparse grads are coalesced first (duplicate indices summed: the sum
        may overflow and must be checked) and replace ``.grad``; the values of
        any sparse grad are what is checked and unscaled. Returns (tensors,
        columns, whether any grad was sparse).
        """
        out, cols, sparse = [], [], False
        for p, c in zip(self.params, self.cols):
            g = p.grad
            if g is None:
                continue
            if dtensor:
                g = distributed.local_tensor(g)
            if g.is_sparse:
                sparse = True
                if g.dtype is torch.float16:
                    g = g.coalesce()
                    p.grad = g
                g = g._values()
            out.append(g)
            cols.append(c)
        return out, cols, sparse

    def counts(self, stats: AmpStats | None, n: int, cols: list[int] | None):
        """(counts tensor for the op, pending index or None) for ``n`` present grads.

        The common case is a view of the stats' counts that the kernel adds
        into directly. Otherwise (some grads missing, another device) the kernel
        fills a temporary that :meth:`flush` adds into the counts by column.
        """
        if stats is None or stats.device is None or not stats.track_overflow:
            return None, None
        if cols is None and self.col_start is not None and self.device == stats.device:
            src, view = self._view
            if src is not stats.counts:  # counts are re-allocated when columns are added
                view = stats.counts.narrow(0, self.col_start, n)
                self._view = (stats.counts, view)
            return view, None
        tmp = torch.zeros(n, dtype=torch.int64, device=self.device)
        cols = self.cols if cols is None else cols
        if self._index is None or self._index[1].device != stats.device or self._index[0] != cols:
            self._index = (cols, _to_device(cols, stats.device))
        return tmp, self._index[1]

    @staticmethod
    def flush(stats: AmpStats, tmp: Tensor | None, index: Tensor | None) -> None:
        if index is not None:
            stats.counts.index_add_(0, index, tmp.to(stats.device, non_blocking=True))


class StepBuffers:
    """One optimizer's per-step device scalars, made once on the scale's device.

    Two found_inf flags used on alternate steps: a step's checks set one, the
    update that reads it zeroes the other (its ``next_found_inf``), so no step
    allocates or zeroes a flag and the flag just read stays readable until the
    next update. ``clean[i]``: flag i is known to be zero. ``clip_coef`` and
    ``step_scale`` are written by the clip kernel.
    """

    __slots__ = ("flags", "clean", "clip_coef", "step_scale")

    def __init__(self, device: torch.device) -> None:
        # separate tensors, not views of one: ops that take two of them (a flag
        # read, the next one zeroed) then hold no aliased arguments (torch.compile)
        zero = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(4)]
        self.flags = (zero[0], zero[1])
        self.clean = [True, True]
        self.clip_coef, self.step_scale = zero[2], zero[3]

    def take(self, parity: int) -> Tensor:
        """The flag this step's checks set (zeroed here only if a skipped update left it set)."""
        flag = self.flags[parity]
        if not self.clean[parity]:
            flag.zero_()
        self.clean[parity] = False
        return flag


def _keeps_fp32_masters(optimizer, p: Tensor, group: dict) -> bool:
    needs = getattr(optimizer, "needs_master", None)  # amp_engine's optimizers
    return bool(callable(needs) and needs(p, group))


class OptimizerGrads:
    """What the scaler caches per optimizer: device groups and how to step it.

    ``fp16_unmastered``: some fp16 param has no fp32 master, so its grads must not
    be unscaled in place (torch refuses them in ``unscale_``: a plain optimizer
    would step the fp16 weights directly); amp_engine's optimizers keep masters.
    """

    def matches(self, optimizer) -> bool:
        """False once param groups were added, or a group's list replaced or resized.

        Identity (``is``) of the lists, not their ``id()``: Dynamo 2.11 cannot trace
        ``id()`` of a list, and this runs inside a compiled step.
        """
        lists = [g["params"] for g in optimizer.param_groups]
        return len(lists) == len(self.lists) and all(
            a is b and len(a) == n for a, b, n in zip(lists, self.lists, self.lengths))

    __slots__ = ("lists", "lengths", "groups", "mesh", "sharding", "grad_scaler_kwarg",
                 "fp16_unmastered", "buffers")

    def __init__(self, optimizer, stats: AmpStats, opt_index: int) -> None:
        self.lists, self.lengths = _param_lists(optimizer)
        by_device: dict[torch.device, tuple[list, list]] = {}
        seen: set[int] = set()
        self.fp16_unmastered = False
        self.buffers: StepBuffers | None = None
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"optimizer.param_groups[{gi}]['params'][{pi}] is a {type(p).__name__}; "
                        "expected a torch.Tensor"
                    )
                if id(p) in seen:  # listed twice (torch only warns): unscale its grad once
                    continue
                seen.add(id(p))
                if p.dtype == torch.float16 and not self.fp16_unmastered:
                    self.fp16_unmastered = not _keeps_fp32_masters(optimizer, p, group)
                params, names = by_device.setdefault(p.device, ([], []))
                params.append(p)
                names.append(f"{type(optimizer).__name__}#{opt_index}.param_groups[{gi}][{pi}]")
        self.groups = [
            DeviceGrads(dev, params, stats.columns_for(params, names))
            for dev, (params, names) in by_device.items()
        ]
        # DTensor (FSDP2) params: which mesh to reduce over, and whether the
        # layout allows summing norms and counts over its shard dimension
        self.mesh, self.sharding = distributed.dtensor_layout(p for g in self.groups for p in g.params)
        try:
            sig = inspect.signature(optimizer.step).parameters
            self.grad_scaler_kwarg = "grad_scaler" in sig
        except (TypeError, ValueError):
            self.grad_scaler_kwarg = False

    def buffers_on(self, device: torch.device) -> StepBuffers:
        if self.buffers is None or self.buffers.clip_coef.device != device:
            self.buffers = StepBuffers(device)
        return self.buffers
