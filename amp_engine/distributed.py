"""found_inf reduction across ranks, so that every rank makes the same skip decision.

With data parallelism each rank checks its own grads (FSDP2: its own shards). If
one rank sees an overflow and another does not, the ranks must still skip (or
apply) the step together, or their parameters drift apart, and the loss scale
must move identically everywhere. So before any skip decision the per-rank
flag is all-reduced with MAX: a flag of exactly 0.0 / 1.0 stays 0.0 / 1.0
(a SUM would give 2.0 on two overflowing ranks, which torch's fused optimizers
read as "no overflow": they test ``found_inf == 1``).

Works with any torch.distributed backend: NCCL (CUDA tensors: the reduction is
ordered on the current stream, the host does not wait) and gloo (CPU tensors;
gloo also takes CUDA tensors through a host copy).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_found_inf_", "dtensor_mesh", "is_dtensor", "local_tensor"]


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


def dtensor_mesh(params: Iterable[Tensor]):
    """The DeviceMesh of the first DTensor among ``params``, or None if there is none."""
    cls = _dtensor_class()
    if cls is None:
        return None
    for p in params:
        if isinstance(p, cls):
            return p.device_mesh
    return None


def _mesh_groups(mesh) -> list:
    # MAX is associative: reducing over every mesh dimension in turn reaches
    # every rank of the mesh (HSDP: the shard and the replicate dimension).
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def all_reduce_found_inf_(found_inf: Tensor, process_group=None, device_mesh=None) -> Tensor:
    """MAX-reduce ``found_inf`` in place across ranks and return it.

    Args:
        found_inf: one-element fp32 tensor (0.0 = clean, 1.0 = overflow) on a
            device the process group's backend handles (CUDA for NCCL, CPU or
            CUDA for gloo).
        process_group: the group to reduce over (``torch.distributed.group.WORLD``
            for every rank). Used if given.
        device_mesh: else the DeviceMesh of DTensor grads (FSDP2): reduced over
            every mesh dimension.

    Without a group or mesh, or when torch.distributed is not initialized, this
    is a no-op. With NCCL the collective is queued on the current stream: no
    host sync. The result is exactly 0.0 or 1.0 when the inputs are.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return found_inf
    if process_group is not None:
        groups = [process_group]
    elif device_mesh is not None:
        groups = _mesh_groups(device_mesh)
    else:
        return found_inf
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf
