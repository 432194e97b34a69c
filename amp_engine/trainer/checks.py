"""What the trainer measures around its steps: AMP validation (``validate_amp``),
memory (``track_memory_usage``) and accuracy counts.

See amp_engine.trainer.memory for how memory is measured. Here: *when*. The CPU figure
comes from the real step (saved-tensor hooks around its forward); on CUDA the
peak allocated memory of the real step's forward+backward is compared with an
fp32 forward+backward of the first AMP batch, run once, side-effect free,
while the weights are still fp32. The grads a pass creates are taken out of its
peak (they are counted with the state), so both devices split the same way.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from amp_engine.distributed import is_dtensor
from amp_engine.trainer.memory import SavedTensorMeter, cuda_pass_peak, memory_comparison, state_bytes
from amp_engine.trainer.trial import first_tensor, isolated_pass, run_model


def accuracy_counts(output: Tensor | None, targets: Any) -> tuple[Tensor, Tensor] | None:
    """(correct, total) as device tensors for integer class targets, else None.

    Class scores along dim 1: ``(N, C)`` with ``(N,)`` targets, or ``(N, C, d1, ...)``
    with ``(N, d1, ...)``. Targets < 0 (an ``ignore_index`` such as -100) are not counted.
    """
    if output is None or not isinstance(targets, Tensor) or targets.is_floating_point() \
            or targets.is_complex() or targets.dtype == torch.bool or output.dim() != targets.dim() + 1 \
            or output.dim() < 2 or output.shape[0] != targets.shape[0] or output.shape[2:] != targets.shape[1:]:
        return None
    valid = targets >= 0
    correct = ((output.detach().argmax(dim=1) == targets) & valid).sum()
    return correct, valid.sum()


def sync_metrics(loss, outputs, targets, grad_norm, found_inf, scaler) -> dict[str, float]:
    """A step's numbers in one device->host copy: the only sync of a train_step.

    Keys present when their input is: loss, accuracy (from class counts),
    grad_norm, found_inf, scale (the scaler's, when a scaler is given).
    """
    names, parts = [], []
    if loss is not None:
        names.append("loss")
        parts.append(loss.detach().float())
    counts = accuracy_counts(first_tensor(outputs), targets)
    if counts is not None:
        names += ["correct", "total"]
        parts += [counts[0].float(), counts[1].float()]
    for name, t in (("grad_norm", grad_norm), ("found_inf", found_inf)):
        if t is not None:
            if is_dtensor(t):  # torch's clip_grad_norm_ of FSDP2 grads: a replicated DTensor
                t = t.full_tensor()
            names.append(name)
            parts.append(t.detach().float().reshape(()))
    if scaler is not None:
        names.append("scale")
        parts.append(scaler._get_scale_async().float())
    if not parts:
        return {}
    dev = parts[0].device
    values = dict(zip(names, torch.stack([p.to(dev) for p in parts]).tolist()))
    if counts is not None:
        values["accuracy"] = values.pop("correct") / max(values.pop("total"), 1.0)
    return values


def _grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


class StepMemory:
    """Memory measurements of a trainer's AMP steps (first one, then every memory_interval).

    Holds the model it measures and the trainer's logger; the config and the
    statistics it records into are handed in per call (the trainer may replace them).
    """

    def __init__(self, model: torch.nn.Module, logger) -> None:
        self._model, self._logger = model, logger
        self._fp32_reference: int | None = None  # CUDA: fp32 forward+backward bytes
        self.reset()

    def reset(self) -> None:
        self._measured = 0
        self._steps = 0
        self._pending: dict[str, Any] | None = None

    def state(self) -> list[int]:
        """[measured steps, counted steps]: what a checkpoint keeps."""
        return [self._measured, self._steps]

    def load_state(self, state: list[int]) -> None:
        self._measured, self._steps = int(state[0]), int(state[1])

    def due(self, cfg) -> bool:
        """Whether the optimizer step being completed is to be measured (cfg: MixedPrecisionConfig)."""
        if not cfg.track_memory_usage:
            return False
        self._steps += 1
        if self._measured == 0:
            return True
        return cfg.memory_interval > 0 and (self._steps - 1) % cfg.memory_interval == 0

    def prepare_reference(self, inputs: Any, targets: Any, loss_fn, device: torch.device) -> None:
        """CUDA: measure the fp32 forward+backward once (weights must still be fp32)."""
        if device.type != "cuda" or self._fp32_reference is not None:
            return
        model = self._model
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            return  # no fp32 reference possible: the saved-tensor figure is used instead
        with isolated_pass(model):
            def run() -> None:
                loss = loss_fn(run_model(model, inputs), targets)
                loss.backward()
            peak = cuda_pass_peak(run, device)
            self._fp32_reference = max(0, peak - _grad_bytes(model))

    @contextlib.contextmanager
    def forward(self, measure: bool, device: torch.device) -> Iterator[None]:
        """Around the measured micro-batch's forward: saved-tensor bytes (and CUDA peak start)."""
        if not measure:
            yield
            return
        model = self._model
        exclude = list(model.parameters()) + list(model.buffers())
        pending: dict[str, Any] = {"grad_bytes": _grad_bytes(model)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            pending["base"] = torch.cuda.memory_allocated(device)
        with SavedTensorMeter(exclude) as meter:
            yield
        pending["meter"] = meter
        self._pending = pending

    def backward_done(self, device: torch.device) -> None:
        """After the measured backward, before the optimizer step: the CUDA peak."""
        pending = self._pending
        if pending is not None and device.type == "cuda":
            new_grads = _grad_bytes(self._model) - pending["grad_bytes"]
            peak = torch.cuda.max_memory_allocated(device) - pending["base"]
            pending["activations"] = max(0, peak - new_grads)

    def record(self, device: torch.device, optimizer, stats=None) -> None:
        """After backward and the optimizer step (grads still there): one measurement,
        recorded into ``stats`` (a TrainerStats) when given."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        meter = pending["meter"]
        state = state_bytes(self._model, optimizer)
        act_amp, act_fp32, method = meter.saved_bytes, meter.fp32_bytes, "saved_tensors"
        if "activations" in pending and self._fp32_reference is not None:
            act_amp, act_fp32 = pending["activations"], self._fp32_reference
            method = "cuda_peak_allocated"
        measurement = memory_comparison(act_fp32, act_amp, state, method)
        self._measured += 1
        if stats is not None:
            stats.record_memory(measurement)
        self._logger.debug("memory (%s): AMP %.3f MB vs fp32 %.3f MB", method,
                           measurement["amp_bytes"] / 1e6, measurement["fp32_bytes"] / 1e6)


@torch.no_grad()
def compare_outputs(model: torch.nn.Module, cfg, logger, inputs: Any,
                    device: torch.device) -> dict[str, Any]:
    """validate_amp: the first batch's forward in fp32 and under autocast, compared.

    Returns ``{max_abs_error, max_rel_error (max |amp - fp32| / max |fp32|),
    tolerance, amp_finite, passed}`` (or ``error`` if the AMP forward raised);
    logs a warning when it did not pass. Side-effect free (isolated_pass).
    """
    result: dict[str, Any] = {"tolerance": cfg.validate_tolerance}
    with isolated_pass(model):
        ref = first_tensor(run_model(model, inputs))
    try:
        with isolated_pass(model), torch.autocast(device.type, dtype=cfg.dtype,
                                                  cache_enabled=cfg.cache_enabled):
            amp = first_tensor(run_model(model, inputs))
    except RuntimeError as e:
        result.update(passed=False, error=f"{type(e).__name__}: {e}")
        logger.warning("validate_amp: the forward fails under autocast: %s", e)
        return result
    if ref is None or amp is None or not ref.is_floating_point():
        result.update(passed=True, note="no floating-point output to compare")
        return result
    ref, amp = ref.float(), amp.float()
    amp_finite = bool(torch.isfinite(amp).all()) or not bool(torch.isfinite(ref).all())
    err = (amp - ref).abs()
    max_abs = float(err.max()) if err.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = amp_finite and max_rel <= cfg.validate_tolerance
    result.update(max_abs_error=max_abs, max_rel_error=max_rel, amp_finite=amp_finite, passed=passed)
    if not passed:
        logger.warning("validate_amp: autocast(%s) output differs from fp32 by %.3g "
                       "(relative to max |output|), tolerance %.3g%s", cfg.dtype, max_rel,
                       cfg.validate_tolerance, "" if amp_finite else "; AMP output is non-finite")
    else:
        logger.debug("validate_amp: relative error %.3g within %.3g", max_rel, cfg.validate_tolerance)
    return result
