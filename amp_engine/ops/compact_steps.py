"""``adam_step_compact_``: the fused Adam / AdamW step with compact (bf16 / 8-bit) moments.

One Python entry that picks a backend with :func:`amp_engine.ops.dispatch.select`
(as every op: "cuda" > "triton" > "reference" on CUDA tensors, "cpp" >
"reference" on the CPU; ``AMP_ENGINE_BACKEND`` and ``backend=`` as for the other
ops). The compiled kernels (csrc/cpu/adam_step_compact.cpp,
csrc/cuda/adam_step_compact.cu) check their arguments in C++
(csrc/compact_checks.h); the Python backends are checked here. The formats are
:mod:`amp_engine.ops.moments8`'s; the arithmetic is
:mod:`amp_engine.ops.reference.moments8`'s (the truth: backends agree bitwise).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine import _extension
from amp_engine.ops import dispatch, moments8
from amp_engine.ops.optim_steps import check_beta, check_list, device_of, resolve_lr, check_step_args
from amp_engine.ops.validation import check_scalar_tensor

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MOMENT_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


OP = "adam_step_compact_"


def _check_moments(name: str, ts, absmax_name: str, absmax, params) -> None:
    for i, (t, p) in enumerate(zip(ts, params)):
        if t.dtype not in MOMENT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; allowed: float32, bfloat16, "
                            "uint8 (8-bit blocks)")
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                             f"{tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
        if t.dtype == torch.uint8:
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] (8-bit codes) must be contiguous (row-major blocks)")
            a = absmax[i] if i < len(absmax) else None
            want = (moments8.n_blocks(p.numel()),)
            if (not isinstance(a, Tensor) or a.dtype != torch.float32 or tuple(a.shape) != want
                    or a.device != p.device or not a.is_contiguous()):
                got = (f"{a.dtype} {tuple(a.shape)} on {a.device}" if isinstance(a, Tensor)
                       else type(a).__name__)
                raise ValueError(f"{name}[{i}] is uint8 (8-bit blocks) and needs {absmax_name}[{i}]: "
                                 f"a contiguous float32 tensor of shape {want} on {p.device}; got {got}")


def _check_absmax_list(name: str, absmax, n: int) -> None:
    if isinstance(absmax, Tensor) or not isinstance(absmax, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(absmax).__name__}")
    if len(absmax) not in (0, n):
        raise ValueError(f"{name} has {len(absmax)} tensors; expected 0 (no uint8 moments) or "
                         f"{n} (one per param; any tensor where the moment is not uint8)")


def adam_step_compact_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    exp_avg_absmax: Sequence[Tensor], exp_avg_sq_absmax: Sequence[Tensor],
    steps: Sequence[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, maximize: bool = False,
    inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
    rng_state: Tensor | None = None, stochastic_rounding: bool = False,
    backend: str | None = None,
) -> None:
    """One fused Adam / AdamW step whose moments are fp32, bf16 or 8-bit blocks, in place.

    Args as :func:`amp_engine.ops.adam_step_` (no amsgrad), except:
        params: fp32/fp16/bf16 (fp64 params keep fp64 moments: use ``adam_step_``).
        exp_avgs, exp_avg_sqs: per param, the dtype names the format: float32,
            bfloat16 (nearest-even), or uint8 = 8-bit blocks of 256 (codes in the
            param's shape, contiguous). Any mix in one call.
        exp_avg_absmax, exp_avg_sq_absmax: [] when no such moment is uint8, else one
            entry per param: for a uint8 moment its fp32 absmax of shape
            ``[ceil(numel / 256)]`` (updated in place), any tensor otherwise (unused).
    found_inf != 0 leaves everything bitwise unchanged (codes and absmax included).
    """
    params, grads, masters = list(params), list(grads), list(masters)
    exp_avgs, exp_avg_sqs, steps = list(exp_avgs), list(exp_avg_sqs), list(steps)
    exp_avg_absmax, exp_avg_sq_absmax = list(exp_avg_absmax), list(exp_avg_sq_absmax)
    if not params:
        return
    device = device_of(params)
    name = dispatch.select(backend, device, OP)
    lr_tensor, lr_f = resolve_lr(lr, device)
    args = (params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax,
            steps, lr_tensor, lr_f, inv_scale, found_inf, rng_state, float(beta1), float(beta2),
            float(eps), float(weight_decay), bool(decoupled), bool(maximize),
            bool(stochastic_rounding))
    if name in ("cpp", "cuda"):  # checked in C++ (csrc/compact_checks.h)
        torch.ops.amp_engine.adam_step_compact_(*args)
        return
    check_compact_args(*args)
    dispatch.python_backend(name, OP).adam_step_compact_(*args)


def check_compact_args(params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax,
                       exp_avg_sq_absmax, steps, lr_tensor, lr, inv_scale, found_inf, rng_state,
                       beta1, beta2, eps, weight_decay, decoupled, maximize,
                       stochastic_rounding) -> None:
    """Every check of the op, in the op's argument order (the C++ kernels run the same)."""
    check_beta("beta1", beta1)
    check_beta("beta2", beta2)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    n = len(params)
    for nm, ts in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if isinstance(ts, Tensor) or len(ts) != n:
            raise ValueError(f"{nm} has {len(ts)} tensors; expected {n} (one per param)")
    _check_absmax_list("exp_avg_absmax", exp_avg_absmax, n)
    _check_absmax_list("exp_avg_sq_absmax", exp_avg_sq_absmax, n)
    check_step_args(params, grads, masters, {}, steps, lr_tensor, lr, inv_scale, found_inf,
                    rng_state, stochastic_rounding)
    if not n:
        return
    device = params[0].device
    for i, p in enumerate(params):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; adam_step_compact_ takes float32, "
                            "float16 and bfloat16 params (fp64 params: use adam_step_)")
    _check_moments("exp_avgs", exp_avgs, "exp_avg_absmax", exp_avg_absmax, params)
    _check_moments("exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_absmax", exp_avg_sq_absmax, params)
    for i, s in enumerate(steps):
        check_scalar_tensor(s, f"steps[{i}]", torch.float32, device)


def _register_fake() -> None:
    """Shapes-only kernel so torch.compile / FakeTensor can trace the op (it validates
    too: a list mixing real and meta tensors lands here)."""

    @torch.library.register_fake(f"amp_engine::{OP}")
    def _(params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax, steps,
          lr_tensor, lr, inv_scale, found_inf, rng_state, beta1, beta2, eps, weight_decay,
          decoupled, maximize, stochastic_rounding):
        check_compact_args(params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax,
                           exp_avg_sq_absmax, steps, lr_tensor, lr, inv_scale, found_inf,
                           rng_state, beta1, beta2, eps, weight_decay, decoupled, maximize,
                           stochastic_rounding)
        return None


if _extension.LOADED and hasattr(torch.ops.amp_engine, OP):
    _register_fake()


__all__ = ["adam_step_compact_", "check_compact_args"]
