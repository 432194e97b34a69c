"""The checking half of amp_engine.GradScaler: one check (or unscale) pass per device
per optimizer, the found_inf flags it sets, and their reduction over devices and ranks.

Every step's device scalars are made once: each optimizer's two found_inf flags
(used on alternate steps, see scaler.grads.StepBuffers) and the inv_scale that
update_scale_ rewrites in place, so a step allocates nothing and dispatches no op
for them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amp_engine import ops
from amp_engine.distributed import all_reduce_step_
from amp_engine.scaler.grads import OptimizerGrads


class CheckMixin:
    """Grad checks, unscaling and found_inf bookkeeping of amp_engine.GradScaler."""

    def _inv_scale(self) -> Tensor:
        """fp32 inv_scale on the scale's device (fp64 reciprocal, as torch).

        update_scale_ writes it in place for the next step; computed here only
        when the scale was set another way: a new scale tensor (lazy init, torch's
        tests assign ``_scale``), or load_state_dict / update(new_scale), which
        drop the cache. (Not the scale's version counter: under torch.compile
        it is data-dependent and breaks the graph.)
        """
        scale = self._scale
        cache = self._inv_cache
        if cache is None or cache[0] is not scale:
            self._inv_cache = cache = (scale, scale.double().reciprocal().float())
        return cache[1]

    def _flag(self, entry: OptimizerGrads, state, device: torch.device) -> Tensor:
        """A zero found_inf for this step's checks on ``device``: on the scale's
        device the optimizer's persistent flag (no op), elsewhere a new one."""
        if device != self._scale.device:
            return torch.zeros((), dtype=torch.float32, device=device)
        bufs = state["buffers"] = entry.buffers_on(device)
        return bufs.take(self._parity)

    @staticmethod
    def _refuse_fp16(entry: OptimizerGrads, dtensor: bool) -> None:
        """torch's refusal of fp16 grads where they would be unscaled in place and
        no fp32 master stands behind the param (see the class docstring)."""
        if entry.fp16_unmastered and any(
                g.dtype == torch.float16 for grp in entry.groups for g in grp.grads(dtensor)[0]):
            raise ValueError("Attempting to unscale FP16 gradients.")

    def _grads_of(self, optimizer) -> OptimizerGrads:
        entry = self._grad_cache.get(optimizer)
        if entry is None or not entry.matches(optimizer):
            self._stats.lazy_init(self._scale.device)
            entry = OptimizerGrads(optimizer, self._stats, self._n_optimizers_seen)
            self._n_optimizers_seen += 1
            self._grad_cache[optimizer] = entry
        return entry

    # ------------------------------------------------------- check / unscale
    def _run_check(self, optimizer, state, inv_scale: Tensor, unscale: bool, *,
                   found: dict | None = None, count: bool = True) -> dict:
        """One check (read-only) or unscale pass per device; returns found_inf per device."""
        entry = self._grads_of(optimizer)
        if unscale:
            self._refuse_fp16(entry, entry.mesh is not None)
        state["mesh"], state["sharding"] = entry.mesh, entry.sharding
        state["found_inf"] = None  # new flags: the combined one is recomputed
        stats = self._stats if count else None
        found = {} if found is None else found
        inv_on = {inv_scale.device: inv_scale}
        for grp in entry.groups:
            grads, cols = grp.grads(entry.mesh is not None)
            if not grads:
                continue
            inv = inv_on.get(grp.device)
            if inv is None:
                inv = inv_on[grp.device] = inv_scale.to(grp.device, non_blocking=True)
            fi = found.get(grp.device)
            if fi is None:
                fi = found[grp.device] = self._flag(entry, state, grp.device)
            op = ops.unscale_and_check_ if unscale else ops.grad_norm_and_check
            counts, index = grp.counts(stats, len(grads), cols)
            try:
                op(grads, inv, fi, counts)
            except (ValueError, TypeError):
                # sparse grads (the op takes dense ones): handle them as torch does and
                # retry; any other bad input raises again from the same op
                grads, cols, _ = grp.grads_slow(entry.mesh is not None)
                counts, index = grp.counts(stats, len(grads), cols)
                try:
                    op(grads, inv, fi, counts)
                except (ValueError, TypeError) as error:
                    raise self._stats.name_grad_error(error, cols, self._names()) from None
            grp.flush(self._stats, counts, index)
        return found

    def _check_inf_per_device(self, optimizer) -> dict:
        """Read-only check of the still-scaled grads (torch runs a ×1.0 unscale pass here).

        The check uses the real inv_scale, not torch's 1.0: the fused optimizer
        multiplies by inv_scale when it reads the grads, and with a scale below 1
        a finite grad can overflow there (torch's fused path then writes inf/NaN
        into the params). For a scale >= 1 the decision is exactly torch's.
        """
        self._check_scale_growth_tracker("_check_inf_per_device")
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = self._run_check(optimizer, state, self._inv_scale(), False)
        state["grads_scaled"] = True
        return state["found_inf_per_device"]


    def _found_inf(self, state, norm_sq: Tensor | None = None) -> Tensor:
        """The optimizer's found_inf: MAX over devices and ranks, 0-dim fp32 on the scale's device.

        ``norm_sq`` (clip_grad_norm_ on FSDP2 shards) is summed over the shards in place,
        in the same collective.
        """
        fi = state["found_inf"]
        if fi is not None:
            return fi
        per = state["found_inf_per_device"]
        dev = self._scale.device
        if not per:
            fi = torch.zeros((), dtype=torch.float32, device=dev)
        elif len(per) == 1:
            fi = next(iter(per.values())).to(dev, non_blocking=True)
        else:  # max, never sum: fused kernels skip only on found_inf == 1
            fi = torch.stack([t.to(dev, non_blocking=True) for t in per.values()]).amax()
        if self._process_group is not None or state["mesh"] is not None:
            self._all_reduce_step(fi, state, norm_sq)
        if any(t is not fi for t in per.values()):
            state["found_inf_per_device"] = {d: fi.to(d, non_blocking=True) for d in per}
        state["found_inf"] = fi
        return fi

    def _all_reduce_step(self, found_inf: Tensor, state, norm_sq: Tensor | None) -> None:
        # the per-parameter overflow counts ride along: the ranks' reports then
        # agree and name a parameter whichever rank holds its overflowing shard
        counts = base = None
        stats = self._stats
        if stats.track_overflow and stats.device is not None and stats.counts.numel():
            counts, base = stats.counts, self._counts_base
            if base is None or base.device != counts.device or len(base) != len(counts):
                old = base if base is not None and base.device == counts.device else counts[:0]
                base = self._counts_base = torch.cat([old, counts.new_zeros(len(counts) - len(old))])
        all_reduce_step_(found_inf, self._process_group, state["mesh"], sharding=state["sharding"],
                         norm_sq=norm_sq, counts=counts, counts_base=base)
