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
  bf16 grads on every device, optional hysteresis (apex's meaning:
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
from amp_engine.scaler.check import CheckMixin
from amp_engine.scaler.clip import ClipMixin
from amp_engine.scaler.state import StateMixin, check_config, refresh_per_optimizer_state
from amp_engine.scaler.stats import AmpStats

__all__ = ["GradScaler", "OptState"]


class GradScaler(CheckMixin, ClipMixin, StateMixin, torch.amp.GradScaler):
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
    ``enabled=False``, and kept as given (an int ``growth_factor`` stays an int in
    the getters and the state_dict, as torch's). ``GradScaler()`` without CUDA
    warns and disables itself, as torch's.

    fp16 grads: where they would be unscaled in place (:meth:`unscale_`, the step
    of a plain optimizer, :meth:`clip_grad_norm_`) they raise torch's
    ``ValueError("Attempting to unscale FP16 gradients.")`` unless the optimizer
    keeps an fp32 master of every fp16 param (amp_engine's optimizers, by
    default): without one the optimizer would step the fp16 weights directly.
    A fused optimizer's step without unscale_ checks them read-only, as torch's.

    Ops per step (DESIGN.md §5, tests/scaler/test_op_budget.py): with one device
    and amp_engine's optimizer, clip + step + update dispatch three ops
    (grad_norm_and_check, the optimizer's step, update_scale_): the clip
    coefficient, the next inv_scale, the found_inf reset and the overflow
    statistics ride in those launches, and the flags live on the device once.
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
        # kept as given, as torch does (GradScaler(growth_factor=3).get_growth_factor() is 3)
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval,
                         enabled)
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
        self._inv_cache: tuple | None = None  # (scale, fp32 inv_scale of it)
        self._parity = 0  # which of each optimizer's two found_inf flags this step sets
        self._param_names: dict[int, tuple[weakref.ref, str]] = {}
        self._last_step_found_inf: Tensor | bool | None = None
        self._counts_base: Tensor | None = None  # overflow counts after the last all-reduce
        self._hyst_for: tuple = (None, None)  # (scale, tracker) that _hyst last checked

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
            scale = self._scale
            if scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
                scale = self._scale
            if outputs.device != scale.device:  # (a same-device .to() is a no-op call)
                scale = scale.to(device=outputs.device, non_blocking=True)
            return outputs * scale
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
        hyst = self._hysteresis_tracker
        if self._hyst_for[0] is scale and self._hyst_for[1] is hyst and self._stats.device is not None:
            return hyst  # checked already for these tensors: no device objects made per step
        if self._hysteresis_tracker is None or self._hysteresis_tracker.device != scale.device:
            # _scale set from outside (torch's tests do): follow it
            self._hysteresis_tracker = torch.full((), self._init_hysteresis_tracker,
                                                  dtype=torch.int32, device=scale.device)
        self._stats.lazy_init(scale.device)
        self._hyst_for = (scale, self._hysteresis_tracker)
        return self._hysteresis_tracker

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
        counts as a call) or after :meth:`step`, as torch. fp16 grads raise
        ValueError("Attempting to unscale FP16 gradients."), as torch's, unless the
        optimizer keeps fp32 masters of those params (amp_engine's optimizers). No host sync.
        """
        if not self._enabled:
            return
        state = self._check_unscale_stage(optimizer, "unscale_")
        state["found_inf_per_device"] = self._run_check(optimizer, state, self._inv_scale(), True)
        state["grads_scaled"] = False
        state["stage"] = OptState.UNSCALED

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
            inv = state["step_scale"]
            if inv is None:
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
            amp_inputs = (grad_scale, found_inf, clip_coef)
            if getattr(optimizer, "_amp_engine_step_scale", False):
                amp_inputs += (self._step_scale(state, grad_scale),)
            retval = optimizer.step(*args, amp_inputs=amp_inputs, **kwargs)
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

    def _step_scale(self, state, grad_scale) -> Tensor | None:
        """``clip_coef / grad_scale`` ready on the device, for our optimizers (no
        reciprocal of their own): the clip kernel's output, or update_scale_'s
        inv_scale without clipping. None where the grads carry no plain scale."""
        if not state["grads_scaled"] or grad_scale is not self._scale:
            return None
        if state["step_scale"] is not None:
            return state["step_scale"]
        return self._inv_scale() if state["clip_coef"] is None else None

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
        # the flags the next step sets: the update zeroes them (one in its launch)
        nexts = [st["buffers"].flags[1 - self._parity] for st in self._per_optimizer_states.values()
                 if st["buffers"] is not None and not st["buffers"].clean[1 - self._parity]]
        hyst = self._hyst()
        if new_scale is not None:
            self._set_scale(new_scale)
            if found_inf is not None:
                self._stats.record_update(found_inf, scale, self._min_scale)
            for flag in nexts:
                flag.zero_()
            self._inv_cache = None
        else:
            # one launch: the scale rule, the next inv_scale, a zeroed flag and the stats
            cache = self._inv_cache
            # (the same scale tensor: the same device; no torch.device objects made)
            inv = cache[1] if cache is not None and cache[0] is scale else \
                torch.empty((), dtype=torch.float32, device=scale.device)
            ops.update_scale_(scale, growth_tracker, hyst, found_inf,
                              growth_factor=self._growth_factor,
                              backoff_factor=self._backoff_factor,
                              growth_interval=self._growth_interval, hysteresis=self._hysteresis,
                              min_scale=self._min_scale, max_scale=self._max_scale,
                              inv_scale=inv, next_found_inf=nexts[0] if nexts else None,
                              **self._stats.update_args())
            self._stats.counted()
            for flag in nexts[1:]:
                flag.zero_()
            self._inv_cache = (scale, inv)
        for st in self._per_optimizer_states.values():
            if st["buffers"] is not None:
                st["buffers"].clean[1 - self._parity] = True
        self._parity ^= 1
        self._per_optimizer_states = defaultdict(refresh_per_optimizer_state)
        if self._floor_patience and not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
            # (a CUDA graph replays device work only: the host-side check is not captured)
            every = max(1, min(50, self._floor_patience // 4))
            run = self._stats.floor_run_lagged(every)
            if run is not None:
                self._check_floor(run)
