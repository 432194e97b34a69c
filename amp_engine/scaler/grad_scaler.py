"""GradScaler: a drop-in ``torch.amp.GradScaler`` on amp_engine's fused kernels.

Same constructor, methods, exceptions, lazy device placement and state_dict as
torch's (it subclasses it, so ``isinstance`` checks and the private members
other code reads keep working); with the extras at their defaults a run gives
the same scales, skip decisions and parameters as torch's, except that the
scale never goes below ``min_scale``. What changes:

* **One op call per device per step.** Grads are checked (and unscaled) by one
  mixed-dtype kernel call per device; the per-optimizer param lists are cached,
  so the host cost per step is a ``p.grad`` read per param instead of torch's
  per-param Python bucketing.
* **No host sync on fused optimizers.** amp_engine's fused optimizers and
  torch's fused ones (``_step_supports_amp_scaling``) get ``grad_scale`` and
  ``found_inf`` as device tensors (found_inf exactly 0.0 or 1.0: torch's fused
  kernels skip only on ``== 1``); the check is a read-only pass. Any other
  optimizer is stepped as torch does: grads unscaled in place, then one
  ``.item()`` to decide the skip (torch: one per device).
* **Clipping in the step.** :meth:`GradScaler.clip_grad_norm_` replaces
  ``unscale_`` + ``torch.nn.utils.clip_grad_norm_`` with one read-only pass; the
  clip coefficient stays on the device and the step applies it.
* **A scale that cannot collapse.** torch's scale reaches exactly 0 after ~166
  consecutive overflows and then writes NaN into every parameter. Ours stops at
  ``min_scale`` (default ``amp_engine.ops.DEFAULT_MIN_SCALE`` = 2**-24: 40
  consecutive back-offs below torch's default 2**16, far below anything a
  healthy run reaches, with a reciprocal 2**24 that stays finite in fp32). A
  warning (or, with ``raise_at_floor=True``, a RuntimeError) tells when the scale
  has sat at the floor for ``floor_patience`` updates.
* **Checks after unscaling too** (a tiny scale can turn finite grads into inf),
  fp16 and bf16 grads on every device, optional hysteresis (apex's meaning:
  back off on the ``hysteresis``-th consecutive overflow; a clean step refills).
* **Overflow statistics**: on-device counters of steps, skipped steps and
  non-finite grad elements per parameter; :meth:`GradScaler.overflow_report`
  names the parameters that overflowed most and when. See amp_engine.scaler.stats.
* **Distributed**: with ``process_group`` (DDP) or DTensor (FSDP2) grads, found_inf
  is MAX-reduced across ranks before any skip decision, in one small all-reduce
  per step that also carries the overflow counts (so every rank's report names
  the parameter whose shard overflowed, wherever it lives) and, for
  :meth:`clip_grad_norm_` on FSDP2 shards, the squared norm (amp_engine.distributed).
"""
from __future__ import annotations

import numbers
import weakref
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from amp_engine import ops
from amp_engine.distributed import all_reduce_step_
from amp_engine.scaler.clip import ClipMixin
from amp_engine.scaler.grads import OptimizerGrads
from amp_engine.scaler.state import StateMixin, check_config, refresh_per_optimizer_state
from amp_engine.scaler.stats import AmpStats

__all__ = ["GradScaler", "OptState"]


class GradScaler(ClipMixin, StateMixin, torch.amp.GradScaler):
    """Drop-in ``torch.amp.GradScaler`` (same positional arguments, same behaviour).

    Args (beyond torch's ``device, init_scale, growth_factor, backoff_factor,
    growth_interval, enabled``; keyword-only):
        hysteresis: back off only on the ``hysteresis``-th consecutive overflow
            (1 = torch's behaviour).
        min_scale: the scale floor (default 2**-24, see the module docstring).
        max_scale: the scale ceiling (default inf: torch's rule, never grow to inf).
        process_group: MAX-reduce found_inf over this group before skipping (DDP:
            its group). DTensor (FSDP2) grads need none: their mesh is used (and
            then this group too, if given).
        floor_patience: warn when the scale has sat at ``min_scale`` for this
            many consecutive updates (0 disables the check).
        raise_at_floor: raise RuntimeError instead of warning.
        track_overflow: keep per-parameter overflow counts (cheap; on by default).
        overflow_history: overflow steps remembered for :meth:`overflow_report`.

    All arguments are validated (ValueError naming the argument), also when
    ``enabled=False``. ``GradScaler()`` without CUDA warns and disables itself, as torch's.
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True, *, hysteresis: int = 1,
                 min_scale: float = ops.DEFAULT_MIN_SCALE, max_scale: float = ops.DEFAULT_MAX_SCALE,
                 process_group=None, floor_patience: int = 100, raise_at_floor: bool = False,
                 track_overflow: bool = True, overflow_history: int = 64) -> None:
        check_config(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                      min_scale, max_scale)
        if isinstance(floor_patience, bool) or not isinstance(floor_patience, numbers.Integral) \
                or floor_patience < 0:
            raise ValueError(f"floor_patience must be an int >= 0, got {floor_patience!r}")
        super().__init__(device, float(init_scale), float(growth_factor), float(backoff_factor),
                         int(growth_interval), enabled)
        self._hysteresis = int(hysteresis)
        self._min_scale, self._max_scale = float(min_scale), float(max_scale)
        self._init_hysteresis_tracker = self._hysteresis
        self._hysteresis_tracker: Tensor | None = None
        self._process_group = process_group
        self._floor_patience = int(floor_patience)
        self._raise_at_floor = bool(raise_at_floor)
        self._floor_warned = False
        self._stats = AmpStats(overflow_history, track_overflow)
        self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
        self._init_transient()

    def _init_transient(self) -> None:
        # host-side caches that neither pickle nor checkpoint
        self._grad_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._n_optimizers_seen = 0
        self._inv_cache: tuple | None = None
        self._param_names: dict[int, tuple[weakref.ref, str]] = {}
        self._last_step_found_inf: Tensor | bool | None = None
        self._counts_base: Tensor | None = None  # overflow counts after the last all-reduce

    # ----------------------------------------------------------- device state
    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        super()._lazy_init_scale_growth_tracker(dev)
        self._hysteresis_tracker = torch.full((), self._init_hysteresis_tracker,
                                              dtype=torch.int32, device=dev)
        self._stats.lazy_init(dev)

    def scale(self, outputs):
        """``outputs`` (a tensor, or nested lists/tuples/iterables of them) times the scale.

        torch's, with the tensor case redefined here: torch.compile skips every
        function of torch.amp, so an inherited method breaks the graph.
        """
        if self._enabled and isinstance(outputs, Tensor):
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)
        return super().scale(outputs)

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[Tensor, Tensor]:
        # torch's, redefined for torch.compile (see scale)
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise AssertionError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)
        return self._scale, self._growth_tracker

    def _hyst(self) -> Tensor:
        scale = self._scale
        if self._hysteresis_tracker is None or self._hysteresis_tracker.device != scale.device:
            # _scale set from outside (torch's tests do): follow it
            self._hysteresis_tracker = torch.full((), self._init_hysteresis_tracker,
                                                  dtype=torch.int32, device=scale.device)
        self._stats.lazy_init(scale.device)
        return self._hysteresis_tracker

    def _inv_scale(self) -> Tensor:
        """fp32 inv_scale on the scale's device (fp64 reciprocal, as torch), cached per update."""
        scale = self._scale
        cache = self._inv_cache
        if cache is None or cache[0] is not scale or cache[1] != scale._version:
            inv = scale.double().reciprocal().float()
            self._inv_cache = cache = (scale, scale._version, inv)
        return cache[2]

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
                fi = found[grp.device] = torch.zeros((), dtype=torch.float32, device=grp.device)
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

    def _check_unscale_stage(self, optimizer, what: str) -> dict:
        self._check_scale_growth_tracker(what)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            via = " (clip_grad_norm_ counts as unscale_)" if state["clip_coef"] is not None else ""
            raise RuntimeError("unscale_() has already been called on this optimizer since "
                               f"the last update(){via}.")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError(f"{what}() is being called after step().")
        return state

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale ``optimizer``'s grads in place and check them (one op call per device).

        Raises RuntimeError if called twice before :meth:`update` (clip_grad_norm_
        counts as a call) or after :meth:`step`, as torch. fp16 grads are
        accepted. No host sync.
        """
        if not self._enabled:
            return
        state = self._check_unscale_stage(optimizer, "unscale_")
        state["found_inf_per_device"] = self._run_check(optimizer, state, self._inv_scale(), True)
        state["grads_scaled"] = False
        state["stage"] = OptState.UNSCALED

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

    # ------------------------------------------------------------------ step
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        """Check the grads and call ``optimizer.step(*args, **kwargs)`` unless they overflowed.

        amp_engine's fused optimizers and torch's fused ones always have their
        ``step()`` called, with ``grad_scale``, ``found_inf`` (and for ours
        ``clip_coef``) as device tensors (ours get them as ``step(amp_inputs=...)``,
        torch's as attributes set for the call); they skip on the device: no host
        sync. Other optimizers: grads are unscaled (and clipped, after
        :meth:`clip_grad_norm_`) in one pass, then one ``.item()`` decides, as
        torch. Returns what ``optimizer.step`` returned (None if skipped on the
        second path). :attr:`last_step_skipped` tells whether it was skipped.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            if self._grads_of(optimizer).grad_scaler_kwarg:
                return super().step(optimizer, *args, **kwargs)  # torch's deprecated contract
            return self._step_fused(optimizer, state, args, kwargs)

        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        elif state["grads_scaled"]:  # after clip_grad_norm_: unscale and clip in one pass
            inv = self._inv_scale() * state["clip_coef"]
            self._run_check(optimizer, state, inv, True, found=state["found_inf_per_device"],
                            count=False)
            state["grads_scaled"] = False
        if len(state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        skipped = bool(self._found_inf(state).item())  # the one host sync of this path
        retval = None if skipped else optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        self._last_step_found_inf = skipped
        return retval

    def _step_fused(self, optimizer, state, args, kwargs):
        if state["stage"] is OptState.READY:
            self._check_inf_per_device(optimizer)
        found_inf = self._found_inf(state)
        scale = self._scale
        clip_coef = state["clip_coef"]
        ours = getattr(optimizer, "_amp_engine_fused", False)
        if not state["grads_scaled"]:  # the user called unscale_
            grad_scale = getattr(optimizer, "grad_scale", None)
        else:
            if clip_coef is not None and not ours:
                scale = scale / clip_coef  # torch's kernels divide by grad_scale: fold the clip in
            user = getattr(optimizer, "grad_scale", None)  # torch multiplies a preset one in
            grad_scale = scale if user is None else scale * user
        if ours:  # handed over as an argument: a setattr would break torch.compile on torch 2.11
            retval = optimizer.step(*args, amp_inputs=(grad_scale, found_inf, clip_coef), **kwargs)
        else:  # torch's fused-optimizer contract: attributes, deleted after the step
            optimizer.grad_scale = grad_scale
            optimizer.found_inf = found_inf
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
        state["stage"] = OptState.STEPPED
        self._last_step_found_inf = found_inf
        return retval

    # ---------------------------------------------------------------- update
    def update(self, new_scale: float | int | Tensor | None = None) -> None:
        """Update the scale on the device (torch's rule + hysteresis + bounds); no host sync.

        ``new_scale`` (float, int or one-element tensor) sets the scale instead,
        clamped to [min_scale, max_scale]. Once the scale has sat at min_scale
        for ``floor_patience`` consecutive updates this warns once (or raises
        RuntimeError, with ``raise_at_floor``); the check reads a counter copied
        to the host asynchronously every few updates, so it never waits.
        """
        if not self._enabled:
            return
        scale, growth_tracker = self._check_scale_growth_tracker("update")
        found = [self._found_inf(st) for st in self._per_optimizer_states.values()
                 if st["found_inf_per_device"] or st["found_inf"] is not None]
        if new_scale is None and not found:
            raise AssertionError("No inf checks were recorded prior to update.")
        found_inf = None
        if found:
            found_inf = found[0] if len(found) == 1 else torch.stack(found).amax()
        if new_scale is not None:
            self._set_scale(new_scale)
        else:
            ops.update_scale_(scale, growth_tracker, self._hyst(), found_inf,
                              growth_factor=self._growth_factor,
                              backoff_factor=self._backoff_factor,
                              growth_interval=self._growth_interval, hysteresis=self._hysteresis,
                              min_scale=self._min_scale, max_scale=self._max_scale)
        if found_inf is not None:
            self._hyst()
            self._stats.record_update(found_inf, scale, self._min_scale)
        self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
        self._inv_cache = None
        if self._floor_patience and not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
            # (a CUDA graph replays device work only: the host-side check is not captured)
            every = max(1, min(50, self._floor_patience // 4))
            run = self._stats.floor_run_lagged(every)
            if run is not None:
                self._check_floor(run)
