"""The op layer: fused loss-scaling kernels behind one Python entry per op.

Each op takes ``backend=None|"cuda"|"triton"|"cpp"|"reference"``; see
:mod:`amp_engine.ops.dispatch` for how the default is chosen.
"""
from amp_engine.ops.compact_steps import adam_step_compact_
from amp_engine.ops.dispatch import available_backends
from amp_engine.ops.optim_steps import adam_step_, optim_backends, sgd_step_
from amp_engine.ops.scaling import (
    DEFAULT_MAX_SCALE,
    DEFAULT_MIN_SCALE,
    grad_norm_and_check,
    unscale_and_check_,
    update_scale_,
)

__all__ = [
    "available_backends",
    "unscale_and_check_",
    "grad_norm_and_check",
    "update_scale_",
    "DEFAULT_MIN_SCALE",
    "DEFAULT_MAX_SCALE",
    "adam_step_",
    "adam_step_compact_",
    "sgd_step_",
    "optim_backends",
]
