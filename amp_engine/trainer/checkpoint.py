"""Checkpoints of MixedPrecisionTrainer: everything it owns, restored exactly.

``trainer.state_dict()`` holds the trainer's counters and AMP state (fallback,
floor run, statistics), the state of the GradScaler it made, the optimizer it
steps (amp_engine's fused replacement, if it made one) and the scheduler. The
model's weights are the caller's to save (``model.state_dict()``). Resume::

    ckpt = {"model": model.state_dict(), "trainer": trainer.state_dict()}
    ...
    trainer = MixedPrecisionTrainer(config, model, optimizer, scheduler=scheduler)
    model.load_state_dict(ckpt["model"])
    trainer.load_state_dict(ckpt["trainer"])  # either order

and the run continues bitwise as if never stopped (given the same data order).
The checkpoint also names the optimizer-state precision it was written with
(``optimizer_state``: "fp32" / "bf16" / "8bit", None for optimizers other than
amp_engine's Adam/AdamW); a trainer of another precision loads it anyway: the
optimizer converts the moments to its own format (logged), so a run can switch.
The trainer loads the optimizer itself because the order matters with
``memory_efficient``: the weights must be in low precision before the fp32
masters are loaded, or they would be dropped and rebuilt from rounded weights.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch

from amp_engine.trainer.conversion import set_weight_precision, state_precision
from amp_engine.optim import checkpoint as optim_state
from amp_engine.scaler import GradScaler
from amp_engine.trainer.stats import TrainerStats

FORMAT = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_KEYS = ("format", "dtype", "optimizer_class", "amp_wanted", "fallback_reason", "checked_dtype",
         "floor_run", "optimizer_steps", "memory_steps", "stats", "overflow_baseline",
         "validation", "weights_dtype", "scaler", "optimizer", "scheduler")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(sd: dict, key: str) -> int:
    value = sd[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"trainer state_dict[{key!r}] must be an int >= 0, got {value!r}")
    return int(value)


class TrainerStateMixin:
    """The checkpoint half of MixedPrecisionTrainer."""

    def state_dict(self) -> dict[str, Any]:
        """The trainer's state (see the module docstring); syncs to read the scaler.

        Raises RuntimeError inside an accumulation window: its micro-batches'
        grads are not saved. Call it after an optimizer step (or after
        :meth:`flush_accumulation`).
        """
        if self._micro:
            raise RuntimeError(
                f"state_dict() called inside an accumulation window ({self._micro} of "
                f"{self.config.gradient_accumulation_steps} micro-batches done, their grads "
                "are not saved); call it after the optimizer step or flush_accumulation()")
        scaler = None
        if self.scaler is not None:
            scaler = {"device": self.scaler._device, "state": self.scaler.state_dict()}
        return {
            "format": FORMAT,
            "dtype": _dtype_name(self.config.dtype),
            "optimizer_class": type(self.optimizer).__name__,
            "amp_wanted": self._amp_wanted,
            "fallback_reason": self.fallback_reason,
            "checked_dtype": self._checked_dtype,
            "floor_run": self._floor_run,
            "optimizer_steps": self._n_optimizer_steps,
            "memory_steps": self._memory.state(),
            "stats": dataclasses.asdict(self.stats),
            "overflow_baseline": dict(self._overflow_baseline),
            "validation": self.validation,
            "weights_dtype": _dtype_name(self._low_params[0].dtype) if self._low_params else None,
            "optimizer_state": state_precision(self.optimizer),
            "scaler": scaler,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also into a freshly made trainer).

        Everything is checked first: a missing key, a value of the wrong type, a
        checkpoint of another dtype, optimizer class, param shapes or scaler
        configuration raises ValueError and nothing changes. Raises
        RuntimeError inside an accumulation window.
        """
        sd = self._checked_state(state_dict)
        stats = TrainerStats(**sd["stats"])
        weights = sd["weights_dtype"]
        # apply: nothing below raises on a checked dict
        self._amp_wanted, self.fallback_reason = sd["amp_wanted"], sd["fallback_reason"]
        self._checked_dtype, self.stats = sd["checked_dtype"], stats
        self._floor_run, self._n_optimizer_steps = sd["floor_run"], sd["optimizer_steps"]
        self._memory.load_state(sd["memory_steps"])
        self._overflow_baseline = dict(sd["overflow_baseline"])
        self.validation = sd["validation"]
        saved, ours = sd.get("optimizer_state"), state_precision(self.optimizer)
        if saved != ours and saved is not None and ours is not None:
            self.logger.info("checkpoint optimizer_state=%r, this trainer keeps %r: the moments are "
                             "converted on load", saved, ours)
        if self._low_params and weights is not None and self._low_params[0].dtype != _DTYPES[weights]:
            set_weight_precision(self._low_params, self.optimizer, _DTYPES[weights])
        self.optimizer.load_state_dict(sd["optimizer"])
        if sd["scaler"] is not None:
            if self.scaler is None:
                self._make_scaler(torch.device(sd["scaler"]["device"]))
            self.scaler.load_state_dict(sd["scaler"]["state"])
        if self.scheduler is not None and sd["scheduler"] is not None:
            self.scheduler.load_state_dict(sd["scheduler"])

    def _checked_state(self, state_dict: Any) -> dict[str, Any]:
        """ValueError unless `state_dict` is one this trainer can load (nothing changes)."""
        if self._micro:
            raise RuntimeError(f"load_state_dict() called inside an accumulation window "
                               f"({self._micro} micro-batches done); load before training")
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict (MixedPrecisionTrainer.state_dict()), "
                             f"got {type(state_dict).__name__}")
        missing = [k for k in _KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"trainer state_dict is missing {missing}; got keys {sorted(map(str, state_dict))}")
        sd = state_dict
        if sd["format"] != FORMAT:
            raise ValueError(f"trainer state_dict has format {sd['format']!r}; this version reads {FORMAT}")
        if sd["dtype"] != _dtype_name(self.config.dtype):
            raise ValueError(f"the checkpoint was written by a trainer with dtype={sd['dtype']}, this "
                             f"one has dtype={_dtype_name(self.config.dtype)}")
        if sd["optimizer_class"] != type(self.optimizer).__name__:
            raise ValueError(f"the checkpoint holds a {sd['optimizer_class']} state, this trainer "
                             f"steps a {type(self.optimizer).__name__}")
        for key in ("amp_wanted", "checked_dtype"):
            if not isinstance(sd[key], bool):
                raise ValueError(f"trainer state_dict[{key!r}] must be a bool, got {sd[key]!r}")
        if sd["fallback_reason"] is not None and not isinstance(sd["fallback_reason"], str):
            raise ValueError("trainer state_dict['fallback_reason'] must be a str or None")
        _count(sd, "floor_run")
        _count(sd, "optimizer_steps")
        memory = sd["memory_steps"]
        if not (isinstance(memory, (list, tuple)) and len(memory) == 2) or any(
                isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0 for m in memory):
            raise ValueError(f"trainer state_dict['memory_steps'] must be two ints >= 0, got {memory!r}")
        fields = {f.name for f in dataclasses.fields(TrainerStats)}
        if not isinstance(sd["stats"], dict) or set(sd["stats"]) != fields:
            raise ValueError(f"trainer state_dict['stats'] must be a dict with keys {sorted(fields)}")
        if not isinstance(sd["overflow_baseline"], dict):
            raise ValueError("trainer state_dict['overflow_baseline'] must be a dict")
        if sd["weights_dtype"] not in (None, *_DTYPES):
            raise ValueError(f"trainer state_dict['weights_dtype'] = {sd['weights_dtype']!r}; "
                             f"allowed: None, {', '.join(_DTYPES)}")
        state = sd.get("optimizer_state")  # absent from checkpoints written before it existed
        if state is not None and not isinstance(state, str):
            raise ValueError(f"trainer state_dict['optimizer_state'] must be a str or None, got {state!r}")
        self._check_parts(sd)
        return sd

    def _check_parts(self, sd: dict[str, Any]) -> None:
        """The scaler, optimizer and scheduler parts, checked without touching the real ones."""
        scaler = sd["scaler"]
        if scaler is not None:
            if not self.config.enable_grad_scaler:
                raise ValueError("the checkpoint has a GradScaler state but this trainer's config "
                                 "has enable_grad_scaler=False")
            if not isinstance(scaler, dict) or set(scaler) != {"device", "state"} \
                    or not isinstance(scaler["device"], str):
                raise ValueError("trainer state_dict['scaler'] must be None or {'device': str, "
                                 "'state': GradScaler.state_dict()}")
            # a throwaway scaler runs the real scaler's checks on the saved state (on the
            # CPU: the checks do not depend on the device, and CUDA may be absent here)
            GradScaler("cpu", floor_patience=0).load_state_dict(scaler["state"])
        optim_state.validate(self.optimizer, sd["optimizer"])
        if sd["scheduler"] is not None and not isinstance(sd["scheduler"], dict):
            raise ValueError("trainer state_dict['scheduler'] must be None or a dict")
