"""found_inf reduction across ranks, so that every rank makes the same skip decision.

With data parallelism each rank checks its own grads (FSDP2: its own shards). If
one rank sees an overflow and another does not, the ranks must still skip (or
apply) the step together, or their parameters drift apart, and the loss scale
must move identically everywhere. So before any skip decision the per-rank
flag is all-reduced with MAX: a flag of exactly 0.0 / 1.0 stays 0.0 / 1.0
(a SUM would give 2.0 on two overflowing ranks, which torch's fused optimizers
read as "no overflow": they test ``found_inf == 1``).

FSDP2 (``fully_shard``) grads are sharded: a rank checks only its shards, so
what is *summed* over the shard dimension of the mesh (the squared grad norm,
the per-parameter counts of non-finite elements) travels in the same buffer as
found_inf: one small all-reduce per mesh dimension and step (SUM where the grads
are sharded, MAX where they are replicated; found_inf is clamped to 1 after a
SUM, which makes it the MAX). With DDP or a plain process group the grads are
replicated: MAX only.

Works with any torch.distributed backend: NCCL (CUDA tensors: the collective is
queued on the current stream, the host does not wait, and a CUDA graph can
capture it) and gloo (CPU tensors; gloo also takes CUDA tensors through a host
copy, and blocks the host for the few bytes sent).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_step_", "dtensor_layout",
           "is_data_parallel", "is_dtensor", "local_tensor", "replica_group"]


def _dtensor_class():
    # DTensor can exist only if its module was imported: checking sys.modules
    # keeps the common (non-FSDP2) path from importing torch.distributed.tensor.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 params and grads)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (an alias: in-place changes reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def replica_group(model):
    """The process group a ``DistributedDataParallel`` model averages its grads over, else None."""
    from torch.nn.parallel import DistributedDataParallel

    return model.process_group if isinstance(model, DistributedDataParallel) else None


def is_data_parallel(model) -> bool:
    """Whether ``model`` is DDP-wrapped or has DTensor (FSDP2 ``fully_shard``) parameters:
    then the wrapper owns the params' dtype and storage (buckets, shards)."""
    return replica_group(model) is not None or any(is_dtensor(p) for p in model.parameters())


def dtensor_layout(params: Iterable[Tensor]) -> tuple:
    """(mesh, sharding) of DTensor ``params``: (None, None) when there is none.

    ``sharding`` is a tuple with one bool per mesh dimension (True: the params
    are sharded along it, False: replicated) when every param is a DTensor on
    that one mesh with the same layout (FSDP2: ``(True,)``; HSDP:
    ``(False, True)``); else None (mixed meshes or layouts, Partial placements,
    plain tensors among DTensors): then everything is MAX-reduced (found_inf
    stays exact; counts become a lower bound) and clipping takes torch's path.
    """
    cls = _dtensor_class()
    if cls is None:
        return None, None
    mesh = sharding = None
    consistent = True
    for p in params:
        if not isinstance(p, cls):
            consistent = False
            continue
        if mesh is None:
            mesh = p.device_mesh
        kinds = tuple(pl.is_shard() if not pl.is_partial() else None for pl in p.placements)
        if p.device_mesh != mesh or None in kinds or (sharding is not None and kinds != sharding):
            consistent = False
        sharding = kinds if sharding is None else sharding
    return mesh, (sharding if consistent and mesh is not None else None)


def _mesh_groups(mesh) -> list:
    # MAX is associative: reducing over every mesh dimension in turn reaches
    # every rank of the mesh (HSDP: the shard and the replicate dimension).
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def _step_groups(process_group, device_mesh, sharding) -> list[tuple]:
    """[(group, sum)]: the groups to reduce over and whether to SUM (sharded) or MAX.

    The mesh first (its layout says what to sum), then the process group with
    MAX: after the mesh every rank of it holds the same values, so a group that
    covers the mesh changes nothing, and a larger one (other pipeline stages,
    other replicas) brings their found_inf in.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    pairs = []
    if device_mesh is not None:
        sums = sharding if sharding is not None else (False,) * device_mesh.ndim
        pairs += list(zip(_mesh_groups(device_mesh), sums))
    if process_group is not None:
        pairs.append((process_group, False))
    return [(g, s) for g, s in pairs if dist.get_world_size(g) > 1]


def all_reduce_step_(found_inf: Tensor, process_group=None, device_mesh=None, *,
                     sharding: tuple | None = None, norm_sq: Tensor | None = None,
                     counts: Tensor | None = None, counts_base: Tensor | None = None) -> bool:
    """Reduce one step's found_inf, and optionally norm² and overflow counts, in place.

    One fp64 buffer ``[found_inf, norm_sq?, counts - counts_base ...]``, one
    all-reduce per group: over each dimension of ``device_mesh``, SUM where
    ``sharding`` says the grads are sharded (the shards' squared norms and
    counts add up) and MAX elsewhere; then over ``process_group`` with MAX
    (replicated grads: DDP). found_inf ends exactly 0.0 or 1.0 on every rank.

    Args:
        found_inf: 0-dim fp32 flag (0.0 / 1.0) on the process group's device.
        sharding: from :func:`dtensor_layout` (None: MAX over every dimension).
        norm_sq: 0-dim fp32/fp64, the squared norm of this rank's grads (needs
            ``device_mesh`` and ``sharding``; else ValueError).
        counts, counts_base: int64 ``[n]``: cumulative per-parameter counts and
            their value after the previous reduction (identical on every rank).
            Only the increment travels; afterwards ``counts = counts_base +
            reduced increment`` and ``counts_base = counts``.

    Returns whether anything was reduced (False without torch.distributed, a
    group or a mesh, or when every group has one rank). No host sync on NCCL.
    """
    if norm_sq is not None and (device_mesh is None or sharding is None):
        raise ValueError("norm_sq needs device_mesh and its sharding (dtensor_layout): only then "
                         "is it known over which mesh dimensions the squared norms add up")
    groups = _step_groups(process_group, device_mesh, sharding)
    if not groups:
        return False
    if norm_sq is None and counts is None and not any(s for _, s in groups):
        for group, _ in groups:  # found_inf alone, MAX only: in place, nothing to unpack
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        return True
    parts = [found_inf.reshape(1)]
    if norm_sq is not None:
        parts.append(norm_sq.reshape(1))
    if counts is not None:
        parts.append(counts - counts_base)
    buf = torch.cat([t.to(found_inf.device, torch.float64) for t in parts])
    for group, summed in groups:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if summed else dist.ReduceOp.MAX, group=group)
    found_inf.copy_(buf[0].clamp(max=1.0))  # a SUM counted the ranks that overflowed
    if norm_sq is not None:
        norm_sq.copy_(buf[1])
    if counts is not None:
        counts.copy_(counts_base + buf[len(parts) - 1:].to(counts.device, torch.int64))
        counts_base.copy_(counts)
    return True
