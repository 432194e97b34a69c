"""MixedPrecisionConfig: every knob of the trainer, validated on construction.

The field names and defaults are the public contract (training scripts set them
by keyword); :meth:`MixedPrecisionConfig.to_dict` / :meth:`from_dict` give a
JSON-safe round trip (the dtype travels as ``"float16"`` / ``"bfloat16"``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

_DTYPE_NAMES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "torch.float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "torch.bfloat16": torch.bfloat16,
}
_ALLOWED_DTYPES = "torch.float16 / torch.bfloat16 (or the strings 'fp16', 'float16', 'bf16', 'bfloat16')"
#: optimizer_state values -> the storage dtype of Adam's moments (amp_engine.optim.AdamW's
#: exp_avg_dtype / exp_avg_sq_dtype; torch.uint8 = 8-bit blocks, amp_engine/ops/moments8.py)
OPTIMIZER_STATES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}
_ALLOWED_STATES = ("'fp32', '8bit', 'bf16' or None (None: '8bit' with memory_efficient=True, "
                   "else the optimizer's own)")


def parse_dtype(value: Any, field: str = "dtype") -> torch.dtype:
    """torch.float16/torch.bfloat16 or one of their names -> the torch dtype."""
    if isinstance(value, torch.dtype):
        if value in (torch.float16, torch.bfloat16):
            return value
        raise ValueError(f"{field}={value} is not a mixed-precision dtype; allowed: {_ALLOWED_DTYPES}")
    if isinstance(value, str):
        dtype = _DTYPE_NAMES.get(value.strip().lower())
        if dtype is not None:
            return dtype
        raise ValueError(f"{field}={value!r} is not a known dtype name; allowed: {_ALLOWED_DTYPES}")
    raise TypeError(f"{field} must be a torch.dtype or a str, got {type(value).__name__} ({value!r}); "
                    f"allowed: {_ALLOWED_DTYPES}")


@dataclass
class MixedPrecisionConfig:
    """Configuration of :class:`amp_engine.MixedPrecisionTrainer`.

    AMP switches
        enable_amp, enabled: AMP runs only while both are True (``enabled`` is the
            torch-style name, ``enable_amp`` the trainer's; scripts set either). The
            trainer's ``enable_amp()/disable_amp()/toggle_amp()`` flip it at run time.
        dtype: torch.float16 (default; loss scaling needed) or torch.bfloat16.
        autocast_enabled: run the forward under ``torch.autocast``; False keeps the
            forward in the parameters' dtype while the scaler still runs.
        cache_enabled: autocast's cache of low-precision weight copies (per forward).

    Loss scaling (amp_engine.GradScaler)
        enable_grad_scaler: scale the loss and skip steps whose grads are non-finite.
            With bf16 the scaler is pinned at scale 1.0 (bf16 has fp32's range, so
            scaling buys nothing) but still checks every grad and skips bad steps.
        init_scale, growth_factor, backoff_factor, growth_interval: as torch's
            GradScaler (fp16 only). hysteresis, min_scale, max_scale: our scaler's
            extras (None = the scaler's default).
        floor_patience: after this many consecutive overflowing steps with the
            scale at its floor, fp16 AMP is abandoned and training continues in
            fp32 (bf16, whose range is fp32's, only warns: fp32 would not help).

    Step
        gradient_accumulation_steps: micro-batches per optimizer step (loss / N each).
        max_grad_norm: clip the unscaled grads to this L2 norm (None = no clipping;
            the norm is still reported).
        fused_optimizer: replace the given torch Adam/AdamW/SGD by amp_engine.optim's
            fused one (same param groups and hyper-parameters).
        memory_efficient: keep the weights in low precision: bf16 weights updated with
            stochastic rounding (no master copy), or fp16 weights with fp32 masters in
            the optimizer. Normalization layers stay fp32. Implies fused_optimizer.
            Adam/AdamW moments are then 8-bit unless ``optimizer_state`` says otherwise:
            bf16 weights ~6 bytes/param for params + grads + optimizer state, fp16
            weights (fp32 masters) ~10, fp32 training 16.
        optimizer_state: the storage of Adam/AdamW's moments (exp_avg, exp_avg_sq) in
            amp_engine's fused optimizer: "fp32" (8 bytes/param), "bf16" (4,
            round-to-nearest-even) or "8bit" (~2.03: blocks of 256 one-byte codes with
            an fp32 absmax each; the update is computed in fp32). None (default) =
            "8bit" when memory_efficient, else the optimizer's own. Setting it implies
            fused_optimizer. Params under 4,096 elements keep fp32 moments (see
            amp_engine.optim.AdamW); SGD has no moments (a warning says it is
            ignored); amsgrad needs fp32 moments (memory_efficient's default then
            stays fp32, an explicit "8bit"/"bf16" is refused with a warning).

    Housekeeping
        clear_cache, clear_cache_interval: ``torch.cuda.empty_cache()`` every N
            optimizer steps on CUDA (a no-op on the CPU, which has no caching allocator).
        enable_monitoring: count steps/overflows/step times and attribute overflows to
            parameters; off = counters stay 0 and no per-parameter counting.
        log_amp_stats, log_interval: log a statistics line every N optimizer steps.
        track_memory_usage, memory_interval: measure AMP vs fp32 memory on the first
            step and then every N optimizer steps (0 = first step only).
        validate_amp, validate_tolerance: on the first batch compare the AMP forward
            with an fp32 forward; warn if the relative error exceeds the tolerance.
        check_compatibility: run :func:`check_amp_compatibility` at construction;
            an incompatible model trains in fp32 (the reason is logged).
        progress_bar: tqdm bar in ``train_epoch``; None = only when stderr is a TTY.
        overflow_top_k: how many most-overflowing parameters the stats name.
    """

    enable_amp: bool = True
    dtype: torch.dtype = torch.float16
    enabled: bool = True
    enable_grad_scaler: bool = True
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    cache_enabled: bool = True
    autocast_enabled: bool = True
    memory_efficient: bool = False
    clear_cache: bool = True
    enable_monitoring: bool = True
    log_amp_stats: bool = True
    track_memory_usage: bool = True
    validate_amp: bool = True
    check_compatibility: bool = True
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    hysteresis: int = 1
    min_scale: float | None = None
    max_scale: float | None = None
    floor_patience: int = 10
    fused_optimizer: bool = False
    log_interval: int = 100
    clear_cache_interval: int = 100
    memory_interval: int = 0
    validate_tolerance: float = 0.05
    progress_bar: bool | None = None
    overflow_top_k: int = 5
    optimizer_state: str | None = None

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        for f in fields(self):
            kind = _KINDS[f.name]
            setattr(self, f.name, _check(f.name, getattr(self, f.name), kind))
        self._check_relations()

    def _check_relations(self) -> None:
        if self.growth_factor <= 1.0:
            raise ValueError(f"growth_factor={self.growth_factor} must be > 1.0")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={self.backoff_factor} must be in (0, 1)")
        if not math.isfinite(self.init_scale):
            raise ValueError(f"init_scale={self.init_scale} must be finite and > 0")
        lo = self.min_scale if self.min_scale is not None else 0.0
        hi = self.max_scale if self.max_scale is not None else math.inf
        if lo > hi:
            raise ValueError(f"min_scale={self.min_scale} must be <= max_scale={self.max_scale}")
        if not lo <= self.init_scale <= hi:
            raise ValueError(f"init_scale={self.init_scale} must lie in [min_scale, max_scale] = [{lo}, {hi}]")

    @property
    def resolved_optimizer_state(self) -> str | None:
        """The moments' precision the trainer asks for: ``optimizer_state``, else "8bit"
        under memory_efficient, else None (the optimizer's own)."""
        if self.optimizer_state is not None:
            return self.optimizer_state
        return "8bit" if self.memory_efficient else None

    @property
    def amp_requested(self) -> bool:
        """True when both AMP switches are on (the trainer's initial state)."""
        return self.enable_amp and self.enabled

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the dtype as its name ('float16' / 'bfloat16')."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MixedPrecisionConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise TypeError naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"from_dict expects a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise TypeError(f"unknown MixedPrecisionConfig field(s) {unknown}; allowed: {field_names()}")
        return cls(**data)

    def replace(self, **changes: Any) -> "MixedPrecisionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    """The config's field names, in declaration order."""
    return [f.name for f in fields(MixedPrecisionConfig)]


# field -> (kind, constraint); kinds: bool, int>=k, float>0, optional variants.
_KINDS: dict[str, tuple] = {
    "enable_amp": ("bool",),
    "dtype": ("dtype",),
    "enabled": ("bool",),
    "enable_grad_scaler": ("bool",),
    "init_scale": ("float", "positive"),
    "growth_factor": ("float", "positive"),
    "backoff_factor": ("float", "positive"),
    "growth_interval": ("int", 1),
    "cache_enabled": ("bool",),
    "autocast_enabled": ("bool",),
    "memory_efficient": ("bool",),
    "clear_cache": ("bool",),
    "enable_monitoring": ("bool",),
    "log_amp_stats": ("bool",),
    "track_memory_usage": ("bool",),
    "validate_amp": ("bool",),
    "check_compatibility": ("bool",),
    "gradient_accumulation_steps": ("int", 1),
    "max_grad_norm": ("float?", "positive"),
    "hysteresis": ("int", 1),
    "min_scale": ("float?", "positive"),
    "max_scale": ("float?", "positive"),
    "floor_patience": ("int", 1),
    "fused_optimizer": ("bool",),
    "log_interval": ("int", 1),
    "clear_cache_interval": ("int", 1),
    "memory_interval": ("int", 0),
    "validate_tolerance": ("float", "positive"),
    "progress_bar": ("bool?",),
    "overflow_top_k": ("int", 0),
    "optimizer_state": ("state",),
}


def _check(name: str, value: Any, kind: tuple) -> Any:
    what = kind[0]
    if what == "dtype":
        return value
    if what == "state":
        return _check_state(value)
    if what.endswith("?"):
        if value is None:
            return None
        what = what[:-1]
    optional = " or None" if kind[0].endswith("?") else ""
    if what == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool{optional}, got {type(value).__name__} ({value!r})")
        return value
    if what == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int >= {kind[1]}, got {type(value).__name__} ({value!r})")
        if value < kind[1]:
            raise ValueError(f"{name}={value} is out of range; allowed: an int >= {kind[1]}")
        return value
    # float
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float > 0{optional}, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{name}={value} is out of range; allowed: a float > 0{optional}")
    return value


def _check_state(value: Any) -> str | None:
    """optimizer_state: None or one of OPTIMIZER_STATES (case and spaces ignored)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"optimizer_state must be a str or None, got {type(value).__name__} "
                        f"({value!r}); allowed: {_ALLOWED_STATES}")
    name = value.strip().lower()
    if name not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer_state={value!r} is not allowed; allowed: {_ALLOWED_STATES}")
    return name
