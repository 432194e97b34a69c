"""GradScaler.clip_grad_norm_: grad-norm clipping folded into the step.

torch's recipe ``unscale_(opt); clip_grad_norm_(params, max_norm); step(opt)``
reads and writes every grad twice before the optimizer reads them again. Here
one read-only pass (``grad_norm_and_check``) gives the unscaled norm and the
overflow flag; the clip coefficient stays a 0-dim device tensor and the step
applies ``inv_scale * clip_coef`` where the grads are read anyway:

* amp_engine's fused optimizers get ``grad_scale`` and ``clip_coef``;
* torch's fused optimizers (they divide by ``grad_scale`` and know nothing of
  clipping) get ``grad_scale = scale / clip_coef``;
* any other optimizer: one fused unscale-and-clip pass, then torch's step.

The coefficient is torch's: ``clamp(max_norm / (total_norm + 1e-6), max=1.0)``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from amp_engine import ops


class ClipMixin:
    """The clipping half of amp_engine.GradScaler."""

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float,
                        norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip ``optimizer``'s grads to ``max_norm`` (L2 of the unscaled grads) in the next step.

        Replaces ``scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm)``
        with the same result (up to fp32 rounding: the two multiplications become
        one) and one read-only pass. Returns the total norm of the unscaled
        grads: a 0-dim fp32 tensor on the scale's device (inf/nan when they
        overflowed: the step is then skipped), without a host sync unless
        ``error_if_nonfinite=True`` (then it raises RuntimeError on a non-finite
        norm, as torch's).

        Counts as :meth:`unscale_` (calling ``unscale_`` after it raises, as
        torch raises on a second ``unscale_``), but leaves the grads *scaled* in
        place until :meth:`step` consumes them; call ``unscale_`` + torch's
        clip_grad_norm_ if you need to read unscaled grads before the step.

        DTensor (FSDP2) grads: each rank takes the norm of its shards and the
        squares are summed over the mesh's shard dimension in the one all-reduce
        that also reduces found_inf (torch's recipe: an unscale pass, a norm pass,
        a norm all-reduce, a scaling pass, then the found_inf all-reduce); the
        norm returned is a plain tensor, the same on every rank (torch's is a
        replicated DTensor). ``norm_type`` other than 2, sparse grads and DTensor
        layouts other than one mesh shared by all params (Shard or Replicate
        placements) fall back to exactly torch's recipe (``unscale_`` then
        ``torch.nn.utils.clip_grad_norm_``). Disabled scaler: torch's clip_grad_norm_.
        """
        if not self._enabled:
            return torch.nn.utils.clip_grad_norm_(
                _params_with_grad(optimizer), max_norm, norm_type, error_if_nonfinite)
        state = self._check_unscale_stage(optimizer, "clip_grad_norm_")
        entry = self._grads_of(optimizer)
        sharded = entry.mesh is not None
        if float(norm_type) != 2.0 or (sharded and entry.sharding is None):
            return self._clip_fallback(optimizer, state, max_norm, norm_type, error_if_nonfinite)
        self._refuse_fp16(entry, sharded)  # torch's recipe unscales them in place
        inv_scale = self._inv_scale()
        dev = self._scale.device
        # one device, one rank, a plain max_norm: the kernel computes the coefficient
        # and the step's multiplier where it takes the norm (no op of their own)
        in_kernel = (not sharded and len(entry.groups) == 1 and entry.groups[0].device == dev
                     and isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool)
                     and max_norm >= 0)
        bufs = None
        found, norms = {}, []
        inv_on = {inv_scale.device: inv_scale}
        for grp in entry.groups:
            grads, cols = grp.grads(sharded)
            if not grads:
                continue
            inv = inv_on.get(grp.device)
            if inv is None:
                inv = inv_on[grp.device] = inv_scale.to(grp.device, non_blocking=True)
            fi = found[grp.device] = self._flag(entry, state, grp.device)
            counts, index = grp.counts(self._stats, len(grads), cols)
            clip_args = {}
            if in_kernel:
                bufs = state["buffers"]
                clip_args = dict(max_norm=float(max_norm), clip_coef=bufs.clip_coef,
                                 step_scale=bufs.step_scale)
            try:
                norms.append(ops.grad_norm_and_check(grads, inv, fi, counts, **clip_args))
            except (ValueError, TypeError) as error:
                if grp.grads_slow(sharded)[2]:  # sparse grads: torch's recipe handles them
                    return self._clip_fallback(optimizer, state, max_norm, norm_type,
                                               error_if_nonfinite)
                raise self._stats.name_grad_error(error, grp.cols if cols is None else cols,
                                                  self._names()) from None
            grp.flush(self._stats, counts, index)
        if not norms:
            total = torch.zeros((), dtype=torch.float32, device=dev)
        elif len(norms) == 1:
            total = norms[0].to(dev, non_blocking=True)
        else:
            total = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]))
        state["found_inf_per_device"] = found
        state["found_inf"] = None
        state["mesh"], state["sharding"] = entry.mesh, entry.sharding
        if sharded:  # this rank's shards only: sum the squares (fp64: no overflow) over ranks
            norm_sq = total.double().square()
            self._found_inf(state, norm_sq)  # the step's one collective, found_inf with it
            total = norm_sq.sqrt().float()
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        if bufs is not None:
            state["clip_coef"], state["step_scale"] = bufs.clip_coef, bufs.step_scale
        else:
            # exactly torch.nn.utils.clip_grads_with_norm_'s coefficient, kept on the device
            state["clip_coef"] = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        state["grads_scaled"] = True
        state["stage"] = OptState.UNSCALED
        return total

    def _clip_fallback(self, optimizer, state, max_norm, norm_type, error_if_nonfinite):
        self.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(
            _params_with_grad(optimizer), max_norm, norm_type, error_if_nonfinite)


def _params_with_grad(optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
