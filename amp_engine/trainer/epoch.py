"""MixedPrecisionOptimizer: epoch-level training on top of MixedPrecisionTrainer.

``train_epoch(loader)`` runs ``train_step`` over a loader with a tqdm progress
bar (loss, scale, samples/s; shown only on a TTY unless asked), closes a
trailing partial accumulation window, and keeps a per-epoch history;
``validate_epoch(loader)`` evaluates in eval mode.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from amp_engine import _optional
from amp_engine.trainer.config import MixedPrecisionConfig
from amp_engine.trainer.trainer import LossFn, MixedPrecisionTrainer
from amp_engine.trainer.trial import is_plateau, model_device, split_batch


def _progress(loader: Iterable, show: bool, asked: bool, desc: str):
    """A tqdm bar over `loader`, or a silent stand-in. tqdm is optional: a bar asked
    for explicitly without it raises ImportError naming the extra; the automatic
    choice (a TTY) just shows none."""
    if not show or (not asked and not _optional.available("tqdm")):
        return _optional.NoBar(loader)
    tqdm = _optional.require("tqdm.auto", "the progress bar of train_epoch").tqdm
    return tqdm(loader, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=True)


def _batch_size(batch: Any) -> int:
    targets = split_batch(batch)[1]
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    inputs = split_batch(batch)[0]
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    return 1


def _move(model: nn.Module, optimizer: Any, device: torch.device) -> None:
    """model.to(device), keeping the Parameter objects the optimizer holds."""
    if isinstance(optimizer, torch.optim.Optimizer) and optimizer.state:
        raise ValueError(f"the model is on {model_device(model)}, device={str(device)!r}, and the "
                         "optimizer already has state there: move both before training")
    before = [id(p) for p in model.parameters()]
    model.to(device)
    if [id(p) for p in model.parameters()] != before:
        raise ValueError(f"moving the model to {device} replaced its Parameter objects, so the optimizer "
                         "no longer holds them: move the model (model.to(device)) before creating the optimizer")


class _Mean:
    """Sample-weighted running mean of a per-batch metric (None values skipped)."""

    def __init__(self) -> None:
        self.total, self.weight = 0.0, 0

    def add(self, value: float | None, n: int) -> None:
        if value is not None:
            self.total += value * n
            self.weight += n

    @property
    def value(self) -> float | None:
        return self.total / self.weight if self.weight else None


class MixedPrecisionOptimizer:
    """Trains ``model`` epoch by epoch with mixed precision.

    Args:
        model: the module; moved to ``device`` if it is elsewhere, provided the
            optimizer has no state yet and the move keeps the Parameter objects
            (CPU <-> CUDA does); else ValueError: move it before making the optimizer.
        optimizer: a torch optimizer over ``model``'s parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        device: where training runs ("cpu", "cuda", torch.device).
        config: a :class:`MixedPrecisionConfig` (None = defaults).
        logger, scheduler: as :class:`MixedPrecisionTrainer`; a ReduceLROnPlateau
            scheduler is stepped with the loss of each :meth:`validate_epoch`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 device: torch.device | str, config: MixedPrecisionConfig | None = None,
                 logger: logging.Logger | None = None, scheduler: Any = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.device = torch.device(device)
        if isinstance(model, nn.Module) and model_device(model).type != self.device.type:
            _move(model, optimizer, self.device)
        self.loss_fn = loss_fn
        self.trainer = MixedPrecisionTrainer(config, model, optimizer, logger=logger, scheduler=scheduler)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer stepped (amp_engine's fused one after a conversion)."""
        return self.trainer.optimizer

    @property
    def config(self) -> MixedPrecisionConfig:
        return self.trainer.config

    def _show_bar(self, progress_bar: bool | None) -> bool:
        if progress_bar is None:
            progress_bar = self.config.progress_bar
        if progress_bar is None:
            return sys.stderr.isatty()
        return bool(progress_bar)

    def train_epoch(self, loader: Iterable, progress_bar: bool | None = None) -> dict[str, Any]:
        """One pass over ``loader`` (an iterable of ``(inputs, targets)`` batches).

        ``progress_bar``: None = the config's choice (default: only when stderr is a TTY).
        Returns ``{epoch, loss, accuracy (None without class targets), samples,
        batches, optimizer_steps, skipped_steps, time (s), throughput (samples/s),
        scale, amp_steps}``; also appended to the history.
        """
        self.epoch += 1
        self.model.train()
        loss, acc = _Mean(), _Mean()
        samples = batches = opt_steps = skipped = amp_steps = 0
        scale = None
        start = time.perf_counter()
        bar = _progress(loader, self._show_bar(progress_bar), progress_bar is not None
                        or self.config.progress_bar is not None, f"epoch {self.epoch}")
        try:
            for batch in bar:
                n = _batch_size(batch)
                out = self.trainer.train_step(batch, self.loss_fn, self.device)
                loss.add(out["loss"], n)
                acc.add(out["accuracy"], n)
                samples, batches = samples + n, batches + 1
                opt_steps += out["optimizer_step"]
                skipped += out["skipped"]
                amp_steps += out["amp"]
                scale = out["scale"]
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss.value:.4g}", scale=f"{scale:g}",
                                samples_per_s=f"{samples / max(elapsed, 1e-9):.0f}", refresh=False)
        finally:
            bar.close()
        tail = self.trainer.flush_accumulation()
        if tail is not None:
            opt_steps += 1
            skipped += tail["skipped"]
            scale = tail["scale"]
        elapsed = time.perf_counter() - start
        result = {"epoch": self.epoch, "loss": loss.value, "accuracy": acc.value, "samples": samples,
                  "batches": batches, "optimizer_steps": opt_steps, "skipped_steps": skipped,
                  "time": elapsed, "throughput": samples / elapsed if elapsed > 0 else 0.0,
                  "scale": scale, "amp_steps": amp_steps}
        self.history.append({"epoch": self.epoch, "train": result})
        self.trainer.logger.info("epoch %d: loss %.4g, accuracy %s, %.0f samples/s, %d/%d steps skipped",
                                 self.epoch, result["loss"] if result["loss"] is not None else float("nan"),
                                 "n/a" if acc.value is None else f"{acc.value:.4f}", result["throughput"],
                                 skipped, opt_steps)
        return result

    def validate_epoch(self, loader: Iterable) -> dict[str, Any]:
        """Evaluate on ``loader`` in eval mode (restored after); no grads.

        Returns ``{epoch, loss, accuracy, samples, time}``; recorded in the history
        of the current epoch. A ReduceLROnPlateau scheduler is stepped with the loss.
        """
        was_training = self.model.training
        self.model.eval()
        loss, acc = _Mean(), _Mean()
        samples = 0
        start = time.perf_counter()
        try:
            for batch in loader:
                n = _batch_size(batch)
                out = self.trainer.validate_step(batch, self.loss_fn, self.device)
                loss.add(out["loss"], n)
                acc.add(out["accuracy"], n)
                samples += n
        finally:
            self.model.train(was_training)
        result = {"epoch": self.epoch, "loss": loss.value, "accuracy": acc.value, "samples": samples,
                  "time": time.perf_counter() - start}
        if self.history and self.history[-1]["epoch"] == self.epoch:
            self.history[-1]["val"] = result
        else:
            self.history.append({"epoch": self.epoch, "val": result})
        scheduler = self.trainer.scheduler
        if scheduler is not None and is_plateau(scheduler) and loss.value is not None:
            scheduler.step(loss.value)
        return result

    def get_training_stats(self) -> dict[str, Any]:
        """``{epochs, history: [{epoch, train, val}], amp: trainer.get_amp_stats()}``."""
        return {"epochs": self.epoch, "history": [dict(h) for h in self.history],
                "amp": self.trainer.get_amp_stats()}

    def cleanup(self) -> None:
        """Release what the trainer holds (see :meth:`MixedPrecisionTrainer.cleanup`)."""
        self.trainer.cleanup()


def create_mixed_precision_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                                     device: torch.device | str, *, logger: logging.Logger | None = None,
                                     scheduler: Any = None, **config_fields: Any) -> MixedPrecisionOptimizer:
    """A :class:`MixedPrecisionOptimizer` whose config is made of ``config_fields``.

    Unknown field names raise TypeError listing the allowed ones.
    """
    return MixedPrecisionOptimizer(model, optimizer, loss_fn, device, MixedPrecisionConfig.from_dict(config_fields),
                                   logger=logger, scheduler=scheduler)
