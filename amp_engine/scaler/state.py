"""GradScaler's configuration checks, checkpoints, pickling and statistics.

The state_dict is a superset of torch's five keys (scale, growth_factor,
backoff_factor, growth_interval, _growth_tracker): torch's GradScaler loads
ours (it reads only its keys) and ours loads torch's (missing extras keep their
current values; the hysteresis tracker starts full).
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from amp_engine.scaler.stats import named_parameter_ids

logger = logging.getLogger("amp_engine.scaler")

#: torch's keys (all required when loading).
TORCH_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
#: The keys our state_dict adds to torch's.
EXTRA_KEYS = ("hysteresis", "_hysteresis_tracker", "min_scale", "max_scale", "steps",
              "skipped_steps", "steps_at_floor")


def refresh_per_optimizer_state() -> dict[str, Any]:
    """torch's per-optimizer state (stage, found_inf_per_device) plus ours.

    found_inf: the combined, rank-reduced flag once computed; clip_coef: set by
    clip_grad_norm_; grads_scaled: the grads still carry the scale (checked
    read-only, or norm taken, but not unscaled in place); mesh, sharding: the
    DTensor mesh and layout (amp_engine.distributed.dtensor_layout); buffers: the
    optimizer's persistent flags (scaler.grads.StepBuffers) when a check used one;
    step_scale: inv_scale * clip_coef as the clip kernel wrote it (None: compute it).
    A module-level factory so that the scaler pickles.
    """
    return {"stage": OptState.READY, "found_inf_per_device": {}, "found_inf": None,
            "clip_coef": None, "grads_scaled": False, "mesh": None, "sharding": None,
            "buffers": None, "step_scale": None}


def real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def counter(value, name: str) -> int:
    """A saved counter: an int >= 0 (ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"state_dict[{name!r}] must be an int >= 0, got {value!r}")
    return int(value)


def check_growth_factor(value) -> float:
    growth = real(value, "growth_factor")
    if not (growth > 1.0 and math.isfinite(growth)):
        raise ValueError(f"growth_factor must be a finite number > 1, got {value!r}")
    return growth


def check_backoff_factor(value) -> float:
    backoff = real(value, "backoff_factor")
    if not 0.0 < backoff < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {value!r}")
    return backoff


def check_config(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                 min_scale, max_scale) -> None:
    """ValueError naming the argument, the value given and what is allowed."""
    check_growth_factor(growth_factor)
    check_backoff_factor(backoff_factor)
    positive_int(growth_interval, "growth_interval")
    positive_int(hysteresis, "hysteresis")
    lo, hi = real(min_scale, "min_scale"), real(max_scale, "max_scale")
    if not (lo > 0.0 and math.isfinite(lo)):
        raise ValueError(f"min_scale must be a finite number > 0, got {min_scale!r}")
    if not hi >= lo:
        raise ValueError(f"max_scale ({max_scale!r}) must be >= min_scale ({min_scale!r})")
    init = real(init_scale, "init_scale")
    if not (math.isfinite(init) and init > 0.0):
        raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
    if not lo <= init <= hi:
        raise ValueError(f"init_scale ({init_scale!r}) must lie in [min_scale, max_scale] = "
                         f"[{min_scale!r}, {max_scale!r}]")


class StateMixin:
    """The checkpoint / pickling / statistics half of amp_engine.GradScaler."""

    # ------------------------------------------------------- torch's setters
    def set_growth_factor(self, new_factor: float) -> None:
        """Set the growth factor (ValueError unless a finite number > 1); kept as given, as torch."""
        check_growth_factor(new_factor)
        self._growth_factor = new_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the backoff factor (ValueError unless in (0, 1)); kept as given, as torch."""
        check_backoff_factor(new_factor)
        self._backoff_factor = new_factor

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the growth interval (ValueError unless an int >= 1)."""
        positive_int(new_interval, "growth_interval")
        self._growth_interval = new_interval

    def get_hysteresis(self) -> int:
        """The configured hysteresis (1 = torch's behaviour)."""
        return self._hysteresis

    @property
    def min_scale(self) -> float:
        return self._min_scale

    @property
    def max_scale(self) -> float:
        return self._max_scale

    def _get_hysteresis_tracker(self) -> int:
        t = self._hysteresis_tracker
        return self._init_hysteresis_tracker if t is None else int(t.item())

    def _check_floor(self, run: int) -> None:
        if run < self._floor_patience:
            self._floor_warned = False
            return
        msg = (f"amp_engine.GradScaler: the loss scale has sat at its floor min_scale="
               f"{self._min_scale:g} for {run} consecutive updates: the grads overflow (or are "
               "NaN) at any scale. Check the loss and the model for NaN/inf (e.g. a bf16-trained "
               "model run in fp16) rather than the scaler.")
        if self._raise_at_floor:
            raise RuntimeError(msg)
        if not self._floor_warned:
            self._floor_warned = True
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _set_scale(self, new_scale) -> None:
        """update(new_scale): torch's checks, then the value clamped to [min_scale, max_scale]."""
        if isinstance(new_scale, torch.Tensor):
            reason = ("new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                      "torch.FloatTensor with requires_grad=False.")
            if new_scale.device.type != self._device or new_scale.numel() != 1 \
                    or new_scale.requires_grad:
                raise AssertionError(reason)
            self._scale.copy_(new_scale.detach().reshape(()).clamp(self._min_scale,
                                                                     self._max_scale))
            return
        value = real(new_scale, "new_scale")
        if not (value > 0.0 and math.isfinite(value)):
            raise ValueError(f"new_scale must be a finite number > 0, got {new_scale!r}")
        self._scale.fill_(min(max(value, self._min_scale), self._max_scale))

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's five entries plus hysteresis, its tracker, the bounds and the counters.

        Empty if disabled. Syncs (reads the scale and trackers), as torch's.
        """
        state = super().state_dict()
        if self._enabled:
            state.update(hysteresis=self._hysteresis,
                         _hysteresis_tracker=self._get_hysteresis_tracker(),
                         min_scale=self._min_scale, max_scale=self._max_scale,
                         **self._stats.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or torch's state_dict (no-op if disabled; RuntimeError if empty).

        Every entry is checked before anything changes: a missing key, a value
        of the wrong type or out of range raises ValueError naming it, and the
        scaler stays as it was. A saved scale outside [min_scale, max_scale]
        (torch's collapsed 0.0, say) is clamped into it, with a warning. Loading
        between ``unscale_``/``step`` and ``update`` raises RuntimeError.
        """
        if not self._enabled:
            return
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict (GradScaler.state_dict()), got "
                            f"{type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        if any(st["stage"] is not OptState.READY for st in self._per_optimizer_states.values()):
            raise RuntimeError("load_state_dict() called in the middle of an iteration (after "
                               "unscale_()/step(), before update()); load before scale()")
        sd = dict(state_dict)
        missing = [k for k in TORCH_KEYS if k not in sd]
        if missing:
            raise ValueError(f"state_dict is missing {missing} (GradScaler.state_dict() writes "
                             f"{list(TORCH_KEYS)}); got keys {sorted(map(str, sd))}")
        hysteresis = sd.get("hysteresis", self._hysteresis)
        lo, hi = sd.get("min_scale", self._min_scale), sd.get("max_scale", self._max_scale)
        scale = real(sd["scale"], "state_dict['scale']")
        if not (math.isfinite(scale) and scale >= 0.0):
            raise ValueError(f"state_dict['scale'] must be a finite number >= 0, got {scale!r}")
        clamped = min(max(scale, real(lo, "min_scale")), real(hi, "max_scale"))
        check_config(clamped, sd["growth_factor"], sd["backoff_factor"], sd["growth_interval"],
                     hysteresis, lo, hi)
        counter(sd["_growth_tracker"], "_growth_tracker")
        hyst_tracker = counter(sd.get("_hysteresis_tracker", hysteresis), "_hysteresis_tracker")
        if hyst_tracker > hysteresis:
            raise ValueError(f"state_dict['_hysteresis_tracker'] = {hyst_tracker} exceeds "
                             f"hysteresis = {hysteresis}")
        for key in ("steps", "skipped_steps", "steps_at_floor"):
            if key in sd:
                counter(sd[key], key)
        if clamped != scale:
            logger.warning("GradScaler.load_state_dict: scale %r clamped to %r (min_scale=%r, "
                           "max_scale=%r)", scale, clamped, lo, hi)
            sd["scale"] = clamped
        super().load_state_dict(sd)
        self._hysteresis, self._min_scale, self._max_scale = int(hysteresis), float(lo), float(hi)
        self._init_hysteresis_tracker = hyst_tracker
        if self._hysteresis_tracker is not None:
            self._hysteresis_tracker.fill_(self._init_hysteresis_tracker)
        self._stats.load_state_dict(sd)
        self._inv_cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # asserts no iteration is in flight, as torch
        if self._enabled:
            state["_init_hysteresis_tracker"] = self._get_hysteresis_tracker()
            state["_hysteresis_tracker"] = None
        for key in ("_grad_cache", "_inv_cache", "_param_names", "_last_step_found_inf",
                    "_n_optimizers_seen", "_counts_base", "_parity", "_hyst_for"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_transient()

    # ------------------------------------------------------------ statistics
    def register_parameter_names(self, model_or_named_parameters) -> None:
        """Name parameters for :meth:`overflow_report`: a module or (name, param) pairs."""
        named = model_or_named_parameters
        if isinstance(named, torch.nn.Module):
            named = named.named_parameters()
        for name, p in named:
            self._param_names[id(p)] = (weakref.ref(p), name)

    def _names(self, named_parameters=None) -> dict[int, str]:
        names = {}
        for pid, (ref, name) in self._param_names.items():
            if ref() is not None:
                names[pid] = name
        if named_parameters is not None:
            if isinstance(named_parameters, torch.nn.Module):
                named_parameters = named_parameters.named_parameters()
            names.update(named_parameter_ids(named_parameters))
        return names

    def overflow_report(self, named_parameters=None, top_k: int | None = 10) -> list[dict]:
        """The parameters whose grads overflowed most (syncs: reads the device counters).

        Args:
            named_parameters: ``model.named_parameters()`` or a module, naming the
                params (else the names given to :meth:`register_parameter_names`,
                else ``"<Optimizer>#k.param_groups[g][i]"``).
            top_k: how many to return (None: all that overflowed).

        Returns a list of ``{"name": str, "count": int, "steps": list[int]}``,
        most non-finite elements first; ``steps`` are update indices (0-based)
        among the last ``overflow_history`` overflow steps. JSON-able.
        """
        if not self._enabled:
            return []
        return self._stats.report(self._names(named_parameters), top_k)

    @property
    def last_step_skipped(self) -> bool | None:
        """Whether the most recent :meth:`step` skipped its optimizer (syncs; None before any)."""
        fi = self._last_step_found_inf
        return fi if fi is None or isinstance(fi, bool) else bool(fi.item())

    @property
    def last_step_skipped_tensor(self) -> torch.Tensor | None:
        """The most recent step's found_inf (0-dim fp32 device tensor, 1.0 = skipped): no sync.

        A copy: the scaler's own flag is reused two steps later.
        """
        fi = self._last_step_found_inf
        if isinstance(fi, bool):
            return torch.full((), float(fi), dtype=torch.float32, device=self._scale.device)
        return None if fi is None else fi.clone()

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-able dict (syncs): steps, skipped_steps, scale, trackers,
        steps_at_floor, bounds. Also runs the at-floor check."""
        if not self._enabled:
            return {"enabled": False}
        floor_run = self._stats.floor_run_now()
        out = {
            "enabled": True,
            "steps": self._stats.updates,
            "skipped_steps": self._stats.skipped_steps(),
            "scale": self.get_scale(),
            "growth_tracker": self._get_growth_tracker(),
            "hysteresis_tracker": self._get_hysteresis_tracker(),
            "steps_at_floor": floor_run,
            "min_scale": self._min_scale,
            "max_scale": None if math.isinf(self._max_scale) else self._max_scale,
            "last_step_skipped": self.last_step_skipped,
        }
        if self._floor_patience:
            self._check_floor(floor_run)
        return out
