"""The trainer's statistics: host-side counters of what the steps did, and their JSON.

Everything here is plain Python numbers that :class:`MixedPrecisionTrainer`
already has on the host (a step's metrics are synced once for its return
value), so keeping statistics costs no extra device synchronization. The
scaler's per-parameter overflow attribution lives on the device
(amp_engine.scaler.stats.AmpStats) and is read only when statistics are asked for.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from amp_engine.trainer.conversion import state_precision
from amp_engine.trainer.memory import GB


@dataclass
class TrainerStats:
    """Counters since construction or the last ``reset_stats()``.

    total_steps: train_step calls (micro-batches); amp_steps: those run with AMP on.
    optimizer_steps: accumulation windows closed (an optimizer step attempted).
    scaler_updates: optimizer steps that went through the GradScaler; overflow_count:
    those whose grads were non-finite (= skipped_steps: the optimizer was not applied).
    """

    total_steps: int = 0
    amp_steps: int = 0
    optimizer_steps: int = 0
    scaler_updates: int = 0
    overflow_count: int = 0
    skipped_steps: int = 0
    step_time_total: float = 0.0
    memory_savings: list[float] = field(default_factory=list)  # bytes, one per measurement
    peak_memory_bytes: int | None = None
    last_memory: dict[str, Any] | None = None
    fallbacks: list[str] = field(default_factory=list)
    cache_clears: int = 0

    def record_step(self, amp: bool, step_time: float) -> None:
        self.total_steps += 1
        self.amp_steps += int(amp)
        self.step_time_total += step_time

    def record_optimizer_step(self, through_scaler: bool, skipped: bool) -> None:
        self.optimizer_steps += 1
        if through_scaler:
            self.scaler_updates += 1
            self.overflow_count += int(skipped)
        self.skipped_steps += int(skipped)

    def record_memory(self, measurement: dict[str, Any]) -> None:
        self.memory_savings.append(float(measurement["savings_bytes"]))
        self.last_memory = measurement
        self.record_peak(measurement["amp_bytes"])

    def record_peak(self, nbytes: int) -> None:
        if self.peak_memory_bytes is None or nbytes > self.peak_memory_bytes:
            self.peak_memory_bytes = int(nbytes)

    def as_dict(self) -> dict[str, Any]:
        """The counters and the ratios derived from them (0.0 where undefined)."""
        n_mem = len(self.memory_savings)
        return {
            "total_steps": self.total_steps,
            "amp_steps": self.amp_steps,
            "scaler_updates": self.scaler_updates,
            "overflow_count": self.overflow_count,
            "amp_usage_ratio": self.amp_steps / self.total_steps if self.total_steps else 0.0,
            "overflow_ratio": self.overflow_count / self.scaler_updates if self.scaler_updates else 0.0,
            "avg_memory_savings": sum(self.memory_savings) / n_mem / GB if n_mem else 0.0,
            "avg_step_time": self.step_time_total / self.total_steps if self.total_steps else 0.0,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "applied_steps": self.optimizer_steps - self.skipped_steps,
            "memory_measurements": n_mem,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_gb": None if self.peak_memory_bytes is None else self.peak_memory_bytes / GB,
            "last_memory_measurement": self.last_memory,
            "fallbacks": list(self.fallbacks),
            "cache_clears": self.cache_clears,
        }


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # dtypes, devices


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> str:
    """Write ``data`` as indented strict JSON, creating parent folders; returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


class TrainerStatsMixin:
    """The statistics half of MixedPrecisionTrainer (its public stats methods)."""

    def get_amp_stats(self) -> dict[str, Any]:
        """Statistics since construction or :meth:`reset_stats` (reads the scaler: syncs).

        Keys: total_steps, amp_steps, scaler_updates, overflow_count, current_scale,
        amp_usage_ratio, overflow_ratio, avg_memory_savings (GB, 10**9 bytes),
        avg_step_time (s); plus optimizer_steps, skipped_steps, applied_steps,
        top_overflow_params ([{name, count, steps}]), peak_memory_bytes/_gb,
        memory_measurements, last_memory_measurement, amp_enabled, fallback_reason,
        fallbacks, dtype, scaler_enabled, monitoring, cache_clears, validation,
        compatible, optimizer_state (the moments' precision of amp_engine's Adam/AdamW:
        "fp32" / "bf16" / "8bit"; None for other optimizers).
        """
        out = self.stats.as_dict()
        out["current_scale"] = self.scaler.get_scale() if self.scaler is not None else 1.0
        out.update(
            top_overflow_params=self._top_overflow_params(),
            amp_enabled=self.amp_enabled, fallback_reason=self.fallback_reason,
            dtype=str(self.config.dtype).removeprefix("torch."),
            optimizer_state=state_precision(self.optimizer),
            scaler_enabled=self.scaler is not None, monitoring=self.config.enable_monitoring,
            validation=self.validation,
            compatible=None if self.compatibility is None else self.compatibility["compatible"],
        )
        return out

    def _top_overflow_params(self) -> list[dict]:
        k = self.config.overflow_top_k
        if self.scaler is None or not self.config.enable_monitoring or k == 0:
            return []
        out = []
        for entry in self.scaler.overflow_report(self.model, top_k=None):
            count = entry["count"] - self._overflow_baseline.get(entry["name"], 0)
            if count > 0:
                out.append({"name": entry["name"], "count": count, "steps": entry["steps"]})
        out.sort(key=lambda d: (-d["count"], d["name"]))
        return out[:k]

    def reset_stats(self) -> None:
        """Zero every counter (the scaler's scale and the fallback state are kept)."""
        self.stats = TrainerStats()
        self._n_optimizer_steps = 0
        self._memory.reset()
        if self.scaler is not None:
            self._overflow_baseline = {d["name"]: d["count"]
                                       for d in self.scaler.overflow_report(self.model, top_k=None)}

    def save_amp_stats(self, path: str) -> str:
        """Write :meth:`get_amp_stats` plus the config as JSON (folders created); returns the path."""
        return save_json(path, {"amp_stats": self.get_amp_stats(), "config": self.config.to_dict()})


    def _log_progress(self, n_steps: int, scale: float | None) -> None:
        s = self.stats.as_dict()
        self.logger.info("step %d: scale %s, overflows %d/%d (%.1f%%), AMP %.0f%% of steps, "
                         "%.1f ms/step", n_steps, scale, s["overflow_count"], s["scaler_updates"],
                         100 * s["overflow_ratio"], 100 * s["amp_usage_ratio"], 1e3 * s["avg_step_time"])

    def _log_summary(self) -> None:
        s = self.get_amp_stats()
        self.logger.info("AMP summary: %d steps (%d with AMP), %d/%d overflows, scale %s%s",
                         s["total_steps"], s["amp_steps"], s["overflow_count"], s["scaler_updates"],
                         s["current_scale"], f"; fell back to fp32: {s['fallback_reason']}"
                         if s["fallback_reason"] else "")

    def _clear_cache(self, device: torch.device) -> None:
        """Return cached CUDA blocks to the driver; the CPU has no caching allocator (no-op)."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
            self.stats.cache_clears += 1
