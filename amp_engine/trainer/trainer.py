"""MixedPrecisionTrainer: one training step under AMP, done right.

A step: forward (and loss) under ``torch.autocast``; ``scaler.scale(loss / N)
.backward()``; every N micro-batches ``scaler.clip_grad_norm_`` (the grad norm
and the overflow check in one read-only pass), ``scaler.step`` (skipped on the
device for fused optimizers), ``scaler.update()``, and the LR scheduler if the
step was applied. The metrics a step returns are gathered into one tensor and
copied to the host once: the only synchronization per step.

AMP off (toggled, or fallen back) means plain fp32 torch steps: no autocast,
no scaler, ``torch.nn.utils`` clipping. Toggles take effect at the next
accumulation window (immediately with gradient_accumulation_steps=1). DDP and
FSDP2 models (torchrun): found_inf is reduced across ranks, who skip together.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from amp_engine.trainer.compat import autocast_support, check_amp_compatibility
from amp_engine.trainer.config import MixedPrecisionConfig
from amp_engine.trainer.conversion import (convert_optimizer, is_fused, low_precision_candidates,
                                          set_weight_precision)
from amp_engine.distributed import is_data_parallel, replica_group
from amp_engine.scaler import GradScaler
from amp_engine.trainer.checks import StepMemory, compare_outputs, sync_metrics
from amp_engine.trainer.checkpoint import TrainerStateMixin
from amp_engine.trainer.stats import TrainerStats, TrainerStatsMixin
from amp_engine.trainer.trial import (cast_floats, is_plateau, model_device, move_to, run_model,
                               split_batch)

LossFn = Callable[[Any, Any], Tensor]


class MixedPrecisionTrainer(TrainerStatsMixin, TrainerStateMixin):
    """Step-level mixed-precision training of ``model`` with ``optimizer``.

    Args:
        config: a :class:`MixedPrecisionConfig` (or a dict of its fields; None = defaults).
        model: the module, already on the device it trains on.
        optimizer: a torch optimizer over ``model``'s parameters. With
            ``fused_optimizer`` (or ``memory_efficient``, or ``optimizer_state``) a torch
            Adam/AdamW/SGD is replaced by amp_engine's fused one: use :attr:`optimizer` afterwards.
        logger: a ``logging.Logger`` (default ``logging.getLogger("amp_engine.trainer")``).
        scheduler: an LR scheduler stepped after every *applied* optimizer step
            (not after skipped ones; ReduceLROnPlateau is left to the caller).

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` (amp_engine.trainer.checkpoint)
    save the trainer, its scaler, optimizer and scheduler; resume is bitwise exact.
    """

    def __init__(self, config: MixedPrecisionConfig | dict | None, model: nn.Module,
                 optimizer: torch.optim.Optimizer, logger: logging.Logger | None = None,
                 scheduler: Any = None) -> None:
        if config is None:
            config = MixedPrecisionConfig()
        elif isinstance(config, dict):
            config = MixedPrecisionConfig.from_dict(config)
        if not isinstance(config, MixedPrecisionConfig):
            raise TypeError(f"config must be a MixedPrecisionConfig, a dict or None, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.logger = logger if logger is not None else logging.getLogger("amp_engine.trainer")
        self.scaler: GradScaler | None = None
        self.fallback_reason: str | None = None
        self.compatibility: dict | None = None
        self.validation: dict | None = None
        self.stats = TrainerStats()
        self._amp_wanted = config.amp_requested
        self._window_amp = False  # AMP state of the accumulation window in progress
        self._micro = 0  # micro-batches done in the window in progress
        self._device: torch.device | None = None
        self._checked_dtype = False
        self._floor_run = 0
        self._n_optimizer_steps = 0  # for the log / cache-clear intervals (also without monitoring)
        self._memory = StepMemory(self.model, self.logger)
        self._overflow_baseline: dict[str, int] = {}
        self._low_params: list[nn.Parameter] = []
        if config.check_compatibility and self._amp_wanted:
            self._check_compatibility()
        if config.fused_optimizer or config.memory_efficient or config.optimizer_state is not None:
            self._convert_optimizer()
        if config.memory_efficient:
            if is_fused(self.optimizer) and not is_data_parallel(model):  # DDP/FSDP2 own the dtype
                self._low_params = low_precision_candidates(model)
            else:
                self.logger.warning("memory_efficient ignored: it needs amp_engine's fused optimizer "
                                    "(masters / stochastic rounding) and no DDP/FSDP2 wrapping")

    # ---------------------------------------------------------------- setup
    def _check_compatibility(self) -> None:
        report = check_amp_compatibility(self.model, self.config.dtype, model_device(self.model))
        self.compatibility = report
        for w in report["warnings"]:
            self.logger.warning("AMP compatibility: %s", w)
        if not report["compatible"]:
            self._fall_back("compatibility check failed: " + "; ".join(report["issues"]))

    def _convert_optimizer(self) -> None:
        self.optimizer = convert_optimizer(self.config, self.optimizer, self.scheduler, self.logger)

    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            self.stats.fallbacks.append(reason)
            self.logger.warning("AMP disabled, training continues in fp32: %s", reason)

    def _make_scaler(self, device: torch.device) -> None:
        cfg = self.config
        kwargs: dict[str, Any] = dict(hysteresis=cfg.hysteresis, floor_patience=0, track_overflow=cfg.enable_monitoring,
                                      process_group=replica_group(self.model))  # DDP: its group
        if cfg.dtype == torch.bfloat16:
            # bf16 has fp32's range: no scaling, but keep the check and skip (scale pinned at 1)
            kwargs.update(init_scale=1.0, min_scale=1.0, max_scale=1.0)
        else:
            kwargs.update(init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                          backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval)
            if cfg.min_scale is not None:
                kwargs["min_scale"] = cfg.min_scale
            if cfg.max_scale is not None:
                kwargs["max_scale"] = cfg.max_scale
        self.scaler = GradScaler(device.type, **kwargs)
        self.scaler.register_parameter_names(self.model)

    def _check_device(self, device: torch.device) -> None:
        if self._device is None or self._device != device:
            where = model_device(self.model)
            if where.type != device.type:
                raise ValueError(f"device={str(device)!r} but the model's parameters are on {where}; "
                                 "move the model (model.to(device)) before creating the optimizer")
            self._device = device

    @property
    def amp_enabled(self) -> bool:
        """Whether the next accumulation window runs AMP."""
        return self._amp_wanted and self.fallback_reason is None

    def _start_window(self, device: torch.device, inputs: Any, targets: Any, loss_fn: LossFn) -> None:
        if self.amp_enabled and not self._checked_dtype:
            self._checked_dtype = True  # once: is the dtype supported on this device?
            ok, why = autocast_support(device, self.config.dtype)
            if not ok:
                self._fall_back(why)
        amp = self.amp_enabled
        if amp and self.config.validate_amp and self.validation is None:
            self.validation = compare_outputs(self.model, self.config, self.logger, inputs, device)
        if amp and self.config.track_memory_usage:
            self._memory.prepare_reference(inputs, targets, loss_fn, device)
        if amp and self.scaler is None and self.config.enable_grad_scaler:
            self._make_scaler(device)
        if self._low_params:  # memory_efficient: weights follow the AMP state
            dtype = self.config.dtype if amp else torch.float32
            if self._low_params[0].dtype != dtype:
                set_weight_precision(self._low_params, self.optimizer, dtype)
        self._window_amp = amp

    # ----------------------------------------------------------------- step
    def _autocast(self, device: torch.device, amp: bool):
        cfg = self.config
        return torch.autocast(device.type, dtype=cfg.dtype, enabled=amp and cfg.autocast_enabled,
                              cache_enabled=cfg.cache_enabled)

    def _forward(self, inputs: Any, targets: Any, loss_fn: LossFn, device: torch.device, amp: bool):
        if self._low_params and not (amp and self.config.autocast_enabled):
            inputs = cast_floats(inputs, self._low_params[0].dtype)
        with self._autocast(device, amp):
            outputs = run_model(self.model, inputs)
            loss = loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
        return outputs, loss.reshape(())

    def train_step(self, batch: Any, loss_fn: LossFn, device: torch.device | str) -> dict[str, Any]:
        """One micro-batch: forward, backward, and every N-th call the optimizer step.

        Args:
            batch: ``(inputs, targets)``; inputs a tensor, tuple (``model(*x)``) or dict
                (``model(**x)``); moved to ``device`` (non_blocking).
            loss_fn: ``loss_fn(outputs, targets) -> one-element tensor`` (a mean over the batch).
            device: where the step runs (the model's device).

        Returns floats ``loss`` (this micro-batch's, before the 1/N), ``accuracy``
        (for integer class targets, else None), ``step_time`` (s), ``scale``,
        ``grad_norm`` (unscaled, before clipping; None between optimizer steps,
        inf/nan when it overflowed), bool ``skipped`` (the optimizer step was
        skipped for non-finite grads), ``optimizer_step`` (an optimizer step
        ended this call) and ``amp`` (this call ran with AMP).
        """
        start = time.perf_counter()
        device = torch.device(device)
        inputs, targets = split_batch(batch)
        inputs, targets = move_to(inputs, device), move_to(targets, device)
        self._check_device(device)
        n = self.config.gradient_accumulation_steps
        if self._micro == 0:
            self._start_window(device, inputs, targets, loss_fn)
        amp = self._window_amp
        measure = amp and self._micro == n - 1 and self._memory.due(self.config)
        try:
            with self._memory.forward(measure, device):
                outputs, loss = self._forward(inputs, targets, loss_fn, device, amp)
        except RuntimeError as error:
            if not amp:
                raise
            outputs, loss = self._retry_in_fp32(error, inputs, targets, loss_fn, device)
            amp, measure = False, False
        use_scaler = amp and self.scaler is not None
        (self.scaler.scale(loss / n) if use_scaler else loss / n).backward()
        self._micro += 1
        grad_norm = found_inf = None
        stepped = self._micro == n
        if stepped:
            grad_norm, found_inf = self._optimizer_step(use_scaler, measure, device)
        values = sync_metrics(loss, outputs, targets, grad_norm, found_inf, self.scaler if use_scaler else None)
        return self._finish(values, amp, use_scaler, stepped, start, device)

    def flush_accumulation(self) -> dict[str, Any] | None:
        """Close an unfinished accumulation window (k < N micro-batches) with an optimizer step.

        The grads are rescaled by N/k first, so the step uses the mean over the k
        micro-batches, as a batch of their size would. Returns ``{scale, skipped,
        grad_norm}`` (floats/bool), or None when no window is open.
        """
        k, n = self._micro, self.config.gradient_accumulation_steps
        if k == 0:
            return None
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, n / k)
        use_scaler = self._window_amp and self.scaler is not None
        grad_norm, found_inf = self._optimizer_step(use_scaler, False, self._device)
        values = sync_metrics(None, None, None, grad_norm, found_inf, self.scaler if use_scaler else None)
        skipped = bool(values.get("found_inf", 0.0))
        self._after_optimizer_step(use_scaler, skipped, values.get("scale"), self._device)
        return {"scale": values.get("scale", 1.0), "skipped": skipped, "grad_norm": values.get("grad_norm")}

    def _retry_in_fp32(self, error: RuntimeError, inputs, targets, loss_fn, device):
        """The forward failed under autocast: if it runs in fp32, AMP is the cause."""
        try:
            outputs, loss = self._forward(inputs, targets, loss_fn, device, False)
        except RuntimeError:
            raise error from None  # not an AMP problem: report the original error
        self._fall_back(f"the forward fails under autocast({self.config.dtype}): {error}")
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and self.scaler is not None and self.scaler._scale is not None:
            # earlier micro-batches of this window left scaled grads: the rest is fp32
            torch._foreach_div_(grads, self.scaler._get_scale_async().to(grads[0].device))
        self._window_amp = False
        return outputs, loss

    def _optimizer_step(self, use_scaler: bool, measure: bool, device: torch.device):
        opt, max_norm = self.optimizer, self.config.max_grad_norm
        self._micro, found_inf = 0, None
        if measure:
            self._memory.backward_done(device)
        if use_scaler:
            grad_norm = self.scaler.clip_grad_norm_(opt, max_norm if max_norm is not None else math.inf)
            self.scaler.step(opt)
            found_inf = self.scaler.last_step_skipped_tensor
            self.scaler.update()
        else:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if max_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            opt.step()
        if measure:
            self._memory.record(device, opt, self.stats if self.config.enable_monitoring else None)
        opt.zero_grad(set_to_none=True)
        return grad_norm, found_inf

    def _finish(self, values: dict, amp: bool, use_scaler: bool, stepped: bool, start: float,
                device: torch.device) -> dict[str, Any]:
        skipped = bool(values.get("found_inf", 0.0))
        if stepped:
            self._after_optimizer_step(use_scaler, skipped, values.get("scale"), device)
        result = {
            "loss": values["loss"], "accuracy": values.get("accuracy"),
            "step_time": time.perf_counter() - start,
            "scale": values.get("scale", 1.0),  # a step without the scaler ran at scale 1
            "skipped": skipped, "grad_norm": values.get("grad_norm"),
            "optimizer_step": stepped, "amp": amp,
        }
        if self.config.enable_monitoring:
            self.stats.record_step(amp, result["step_time"])
        return result

    def _after_optimizer_step(self, use_scaler: bool, skipped: bool, scale: float | None,
                              device: torch.device) -> None:
        cfg, stats = self.config, self.stats
        if not skipped and self.scheduler is not None and not is_plateau(self.scheduler):
            self.scheduler.step()
        if cfg.enable_monitoring:
            stats.record_optimizer_step(use_scaler, skipped)
            if cfg.track_memory_usage and device.type == "cuda":
                stats.record_peak(torch.cuda.max_memory_allocated(device))
        if skipped:
            self.logger.debug("optimizer step skipped: non-finite grads (scale %s)", scale)
        if use_scaler and scale is not None:
            at_floor = skipped and scale <= self.scaler.min_scale
            self._floor_run = self._floor_run + 1 if at_floor else 0
            if self._floor_run == cfg.floor_patience:
                self._stuck_at_floor()
        self._n_optimizer_steps += 1
        n_steps = self._n_optimizer_steps
        if cfg.clear_cache and n_steps % cfg.clear_cache_interval == 0:
            self._clear_cache(device)
        if cfg.log_amp_stats and n_steps % cfg.log_interval == 0:
            self._log_progress(n_steps, scale)

    def _stuck_at_floor(self) -> None:
        if self.config.dtype == torch.float16:
            # overflowing even at the smallest scale: the forward itself exceeds fp16's range
            self._fall_back(f"the loss scale sat at its floor ({self.scaler.min_scale:g}) for "
                            f"{self._floor_run} consecutive overflowing steps")
        else:  # bf16 has fp32's range: fp32 would not help, the model or the data is at fault
            self.logger.warning("%d consecutive steps skipped for non-finite grads under bf16: "
                                "check the loss and the data for NaN/inf", self._floor_run)

    # ----------------------------------------------------------- validation
    @torch.no_grad()
    def validate_step(self, batch: Any, loss_fn: LossFn, device: torch.device | str) -> dict[str, Any]:
        """Forward and loss without grads (AMP if on); floats ``loss``, ``accuracy``, ``step_time``.

        The model's train/eval mode is left as it is (``validate_epoch`` sets eval).
        """
        start = time.perf_counter()
        device = torch.device(device)
        inputs, targets = split_batch(batch)
        inputs, targets = move_to(inputs, device), move_to(targets, device)
        outputs, loss = self._forward(inputs, targets, loss_fn, device, self.amp_enabled)
        values = sync_metrics(loss, outputs, targets, None, None, None)
        return {"loss": values["loss"], "accuracy": values.get("accuracy"),
                "step_time": time.perf_counter() - start}

    # ------------------------------------------------------------ switches
    def enable_amp(self, force: bool = False) -> bool:
        """Turn AMP on (from the next accumulation window); returns whether it is on.

        After a fallback AMP stays off (the reason is logged) unless ``force=True``,
        which clears the fallback and restarts the scale at ``init_scale``.
        """
        if self.fallback_reason is not None:
            if not force:
                self.logger.warning("enable_amp: AMP stays off since it fell back (%s); "
                                    "enable_amp(force=True) overrides", self.fallback_reason)
                return False
            self.fallback_reason, self._floor_run = None, 0
            if self.scaler is not None and self.scaler._scale is not None:
                self.scaler.update(self.config.init_scale if self.config.dtype == torch.float16 else 1.0)
        self._amp_wanted = True
        return self.amp_enabled

    def disable_amp(self) -> bool:
        """Turn AMP off (plain fp32 steps from the next accumulation window); returns False."""
        self._amp_wanted = False
        return False

    def toggle_amp(self) -> bool:
        """Flip AMP on/off; returns the new state."""
        return self.disable_amp() if self._amp_wanted else self.enable_amp()

    def cleanup(self) -> None:
        """Log the final statistics, drop the grads and release cached device memory."""
        if self.config.log_amp_stats and self.stats.total_steps:
            self._log_summary()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        if self._device is not None and self.config.clear_cache:
            self._clear_cache(self._device)


def create_mixed_precision_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, *, logger:
                                   logging.Logger | None = None, scheduler: Any = None, **config_fields: Any):
    """A trainer configured by ``config_fields`` (unknown names raise TypeError naming them)."""
    return MixedPrecisionTrainer(MixedPrecisionConfig.from_dict(config_fields), model, optimizer,
                                 logger=logger, scheduler=scheduler)
