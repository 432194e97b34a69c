"""The fused optimizer-step ops: one Python entry per op, each choosing a backend.

``adam_step_`` (Adam / AdamW) and ``sgd_step_`` update a whole list of params on
one device in one call (one launch per dtype group inside). The arithmetic
contract, the skip rule and the stochastic-rounding bits are written down in
:mod:`amp_engine.ops.reference.optim`, the truth every backend is tested against
(tests/optim/test_step_ops.py compares bitwise).

Backends: "cpp" (csrc/cpu/{adam,sgd}_step.cpp), "cuda" (csrc/cuda/{adam,sgd}_step.cu),
"triton" (module ``amp_engine.ops.triton.optim`` with functions ``adam_step_`` /
``sgd_step_`` taking the schema's arguments positionally, like the reference;
this entry validates before calling it) and "reference". The backend is chosen
by :mod:`amp_engine.ops.dispatch` (the one dispatcher of the op layer); a
backend is offered only where its kernels for these ops exist (``optim_backends``).

For kernel writers, beyond the reference's arithmetic:

* found_inf != 0 (NaN included) skips everything: params, masters, moments, steps
  and rng_state stay bitwise unchanged; read it on the device, never sync;
* each tensor's scalars use its own step: ``step = steps[i] + 1`` (bias
  corrections in fp64, rounded to fp32 once); steps and rng_state[1] are
  incremented by the kernel only when applied;
* SR element offsets ``j``: the offset in the param's memory when the param and
  its grad/master/moments are all dense with one layout (walk them as flat
  arrays), else the row-major index (work on contiguous copies, write back);
* argument checks: csrc/optim_checks.h (C++, both compiled backends) =
  ``check_step_args`` (Python: the Python backends and the fake kernels); the
  SparseCPU/SparseCUDA guards of every op are registered once, in csrc/ops.cpp.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amp_engine import _extension
from amp_engine.ops import dispatch
from amp_engine.ops.validation import check_scalar_tensor

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OPS = ("adam_step_", "sgd_step_")


def optim_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run the optimizer ops on `device`, fastest first."""
    return [b for b in dispatch.available_backends(device, "adam_step_")
            if dispatch.unavailable_reason(b, device, "sgd_step_") is None]


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run both optimizer ops on `device_type`, else why not."""
    return (dispatch.unavailable_reason(backend, device_type, "adam_step_")
            or dispatch.unavailable_reason(backend, device_type, "sgd_step_"))


# ---------------------------------------------------------------- validation
def check_list(ts, name: str, n: int | None, device) -> None:
    if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(ts).__name__}")
    if n is not None and len(ts) != n:
        raise ValueError(f"{name} has {len(ts)} tensors; expected {n} (one per param)")
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are "
                             "allowed (sparse grads are not supported)")
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; allowed: float32, float16, "
                            "bfloat16, float64")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but params[0] is on {device}; "
                             "one call takes tensors of one device")


def _check_state(ts, name: str, params, dtype_of) -> None:
    for i, (t, p) in enumerate(zip(ts, params)):
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                             f"shape {tuple(p.shape)}")
        want = dtype_of(p)
        if t.dtype != want:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected {want} for a "
                            f"{p.dtype} param")


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def check_step_args(params, grads, masters, states, steps, lr_tensor, lr, inv_scale, found_inf,
                    rng_state, stochastic_rounding) -> None:
    """Checks shared by both ops (the compiled backends run the same in C++).

    ``states`` maps a state-list name to the list (moments, momentum buffers).
    """
    check_list(params, "params", None, params[0].device if len(params) else torch.device("cpu"))
    if not len(params):
        return
    device = params[0].device
    n = len(params)
    check_list(grads, "grads", n, device)
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape "
                             f"{tuple(p.shape)}")
    if len(masters):
        check_list(masters, "masters", n, device)
        for i, p in enumerate(params):
            if p.dtype not in (torch.float16, torch.bfloat16):
                raise TypeError(f"masters[{i}] given for a {p.dtype} param; fp32 masters are "
                                "for float16/bfloat16 params only (pass masters=[] otherwise)")
        _check_state(masters, "masters", params, lambda p: torch.float32)
    for name, ts in states.items():
        check_list(ts, name, n, device)
        _check_state(ts, name, params, _moment_dtype)
    check_list(steps, "steps", n, device)
    for i, s in enumerate(steps):
        check_scalar_tensor(s, f"steps[{i}]", torch.float32, device)
    if lr_tensor is not None:
        if not isinstance(lr_tensor, Tensor) or lr_tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError("lr_tensor must be a one-element float32/float64 tensor")
        check_scalar_tensor(lr_tensor, "lr_tensor", lr_tensor.dtype, device)
    elif not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if inv_scale is not None:
        check_scalar_tensor(inv_scale, "inv_scale", torch.float32, device)
    if found_inf is not None:
        check_scalar_tensor(found_inf, "found_inf", torch.float32, device)
    if rng_state is not None:
        if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,) or rng_state.device != device:
            raise ValueError(f"rng_state must be an int64 tensor of shape [2] (seed, counter) on "
                             f"{device}; got {rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}")
    elif stochastic_rounding and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("stochastic_rounding=True with bfloat16 params needs rng_state "
                         "(int64 [seed, counter])")


def check_beta(name: str, b: float) -> None:
    if not 0.0 <= b < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {b}")


def resolve_lr(lr, device: torch.device) -> tuple[Tensor | None, float]:
    """(lr_tensor, lr): a tensor on the params' device is read there (no sync)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
        if lr.device == device:
            return (lr if lr.dtype in (torch.float32, torch.float64) else lr.float()), 0.0
        if lr.device.type == "cpu":
            return None, float(lr)  # a host read, not a device sync
        raise ValueError(f"lr is a tensor on {lr.device} but the params are on {device}")
    return None, float(lr)


def device_of(params: Sequence[Tensor]) -> torch.device:
    return params[0].device if len(params) and isinstance(params[0], Tensor) else torch.device("cpu")


# ---------------------------------------------------------------- entries
def adam_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled: bool, amsgrad: bool = False, maximize: bool = False,
    inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
    rng_state: Tensor | None = None, stochastic_rounding: bool = False,
    backend: str | None = None,
) -> None:
    """One fused Adam (``decoupled=False``) / AdamW (``decoupled=True``) step, in place.

    Args:
        params: n tensors on one device, fp32/fp16/bf16/fp64, any shapes.
        grads: n tensors, the params' shapes, any of those dtypes (read once).
        masters: [] or n fp32 masters (fp16/bf16 params only), the params' shapes.
        exp_avgs, exp_avg_sqs: n moments, fp32 (fp64 for fp64 params).
        max_exp_avg_sqs: n like the moments when ``amsgrad``, else [].
        steps: n one-element fp32 counters, += 1 when the step is applied.
        lr: a float, or a one-element tensor (read on the device, no sync).
        inv_scale: one-element fp32, the grad multiplier ``clip_coef / grad_scale``; None = 1.
        found_inf: one-element fp32; != 0 means nothing at all changes. None = apply.
        rng_state: int64 [2] (seed, counter) for ``stochastic_rounding`` of bf16 params.
        backend: None (fastest for the device), "cuda", "triton", "cpp" or "reference".
    """
    params, grads, masters = list(params), list(grads), list(masters)
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = (
        list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(steps))
    if not params:  # nothing to update (a custom op cannot dispatch without a tensor)
        return
    device = device_of(params)
    lr_tensor, lr_f = resolve_lr(lr, device)
    args = (params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor,
            lr_f, inv_scale, found_inf, rng_state, float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
            bool(stochastic_rounding))
    name = dispatch.select(backend, device, "adam_step_")
    if name in ("cpp", "cuda"):
        torch.ops.amp_engine.adam_step_(*args)
        return
    check_beta("beta1", beta1)
    check_beta("beta2", beta2)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_step_args(params, grads, masters, states, steps, lr_tensor, lr_f, inv_scale, found_inf,
                    rng_state, stochastic_rounding)
    dispatch.python_backend(name, "adam_step_").adam_step_(*args)


def sgd_step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], masters: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor], steps: Sequence[Tensor], *,
    lr: float | Tensor, momentum: float = 0.0, dampening: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
    inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
    rng_state: Tensor | None = None, stochastic_rounding: bool = False,
    backend: str | None = None,
) -> None:
    """One fused SGD step, in place (torch's formulas).

    Arguments as :func:`adam_step_`; ``momentum_buffers``: n fp32 (fp64 for fp64
    params) buffers when ``momentum != 0``, else []. A buffer whose counter in
    ``steps`` is 0 is set to the grad (torch's first-step rule, decided on the device).
    """
    params, grads, masters = list(params), list(grads), list(masters)
    momentum_buffers, steps = list(momentum_buffers), list(steps)
    if not params:  # nothing to update (a custom op cannot dispatch without a tensor)
        return
    device = device_of(params)
    lr_tensor, lr_f = resolve_lr(lr, device)
    args = (params, grads, masters, momentum_buffers, steps, lr_tensor, lr_f, inv_scale,
            found_inf, rng_state, float(momentum), float(dampening), float(weight_decay),
            bool(nesterov), bool(maximize), bool(stochastic_rounding))
    name = dispatch.select(backend, device, "sgd_step_")
    if name in ("cpp", "cuda"):
        torch.ops.amp_engine.sgd_step_(*args)
        return
    if not momentum >= 0.0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
    check_step_args(params, grads, masters, states, steps, lr_tensor, lr_f, inv_scale, found_inf,
                    rng_state, stochastic_rounding)
    dispatch.python_backend(name, "sgd_step_").sgd_step_(*args)


def _register_fakes() -> None:
    """Shapes-only kernels so torch.compile / FakeTensor can trace the ops."""

    # The fakes validate too: a list mixing real and meta tensors lands here.
    @torch.library.register_fake("amp_engine::adam_step_")
    def _(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr,
          inv_scale, found_inf, rng_state, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
          maximize, stochastic_rounding):
        states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
        if amsgrad:
            states["max_exp_avg_sqs"] = max_exp_avg_sqs
        check_step_args(params, grads, masters, states, steps, lr_tensor, lr, inv_scale,
                        found_inf, rng_state, stochastic_rounding)
        return None

    @torch.library.register_fake("amp_engine::sgd_step_")
    def _(params, grads, masters, momentum_buffers, steps, lr_tensor, lr, inv_scale, found_inf,
          rng_state, momentum, dampening, weight_decay, nesterov, maximize, stochastic_rounding):
        states = {"momentum_buffers": momentum_buffers} if momentum != 0 else {}
        check_step_args(params, grads, masters, states, steps, lr_tensor, lr, inv_scale,
                        found_inf, rng_state, stochastic_rounding)
        return None


if _extension.LOADED and hasattr(torch.ops.amp_engine, "adam_step_"):
    _register_fakes()
