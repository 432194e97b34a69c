"""Turning a user's torch optimizer into amp_engine's fused one, and switching
the weights between fp32 and low precision (``memory_efficient``).

Memory-efficient weights, the choice made:

* bf16: weights live in bf16 and are updated with stochastic rounding, no fp32
  master (bf16 has fp32's range; unbiased rounding keeps small updates from
  vanishing on average): 2 bytes/param instead of 4, grads 2 instead of 4.
* fp16: weights live in fp16 with fp32 masters in the optimizer state (fp16's
  10-bit mantissa loses small updates outright; its range needs the scaler):
  the weights and grads halve, the master adds 4 bytes, and autocast no longer
  keeps fp16 copies of the weights for the backward.

Optimizer state (``MixedPrecisionConfig.optimizer_state``): Adam/AdamW's moments
in fp32, bf16 or 8-bit blocks (amp_engine.optim.AdamW's ``exp_avg_dtype`` /
``exp_avg_sq_dtype``); memory_efficient asks for 8-bit unless told otherwise, so
bf16 weights hold ~6 bytes/param (weight 2, grad 2, moments ~2.03) against fp32
training's 16.

Normalization layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)
keep fp32 parameters: their statistics overflow or lose precision in fp16.
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any

import torch
from torch import nn

from amp_engine import optim as fused_optim
from amp_engine.trainer.config import OPTIMIZER_STATES, MixedPrecisionConfig

#: torch optimizer class -> amp_engine's fused one (exact types: a subclass may change the math)
FUSED_OPTIMIZERS = {
    torch.optim.AdamW: fused_optim.AdamW,
    torch.optim.Adam: fused_optim.Adam,
    torch.optim.SGD: fused_optim.SGD,
}
_FUSED_TYPES = tuple(set(FUSED_OPTIMIZERS.values()))
# group keys of torch's optimizers that describe torch's implementation, not the math
_IMPLEMENTATION_KEYS = ("foreach", "fused", "differentiable")
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True for amp_engine's fused optimizers."""
    return isinstance(optimizer, _FUSED_TYPES)


def to_fused_optimizer(optimizer: torch.optim.Optimizer, **overrides: Any
                       ) -> tuple[torch.optim.Optimizer | None, str | None]:
    """amp_engine's fused version of ``optimizer``: (new optimizer, None) or (None, why not).

    Same param groups (same Parameter objects, every hyper-parameter and any
    extra key such as ``initial_lr``), and the state carried over when the
    optimizer has already stepped (moments kept in fp32). ``overrides`` (e.g.
    ``master_weights``, ``stochastic_rounding``) are set in every group. An
    amp_engine optimizer is rebuilt as its own class (to apply ``overrides``).
    """
    cls = type(optimizer) if is_fused(optimizer) else FUSED_OPTIMIZERS.get(type(optimizer))
    if cls is None:
        allowed = ", ".join(f"torch.optim.{c.__name__}" for c in FUSED_OPTIMIZERS)
        return None, f"{type(optimizer).__name__} has no fused counterpart (allowed: {allowed})"
    accepted = set(inspect.signature(cls.__init__).parameters)
    groups = []
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            return None, "differentiable=True optimizers cannot be fused"
        # rng_state is made anew (seeded from torch's generator) when a group asks for it
        kept = {k: v for k, v in group.items() if k not in _IMPLEMENTATION_KEYS and k != "rng_state"}
        groups.append({**kept, **overrides})
    defaults = {k: v for k, v in optimizer.defaults.items()
                if k in accepted and k not in _IMPLEMENTATION_KEYS and k != "params"}
    defaults.update((k, v) for k, v in overrides.items() if k in accepted)
    try:
        fused = cls(groups, **defaults)
        if optimizer.state:
            state = optimizer.state_dict()
            for saved, group in zip(state["param_groups"], fused.param_groups):
                saved.update(overrides)
                if "rng_state" in group:
                    saved["rng_state"] = group["rng_state"]
            fused.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as e:
        return None, f"{cls.__module__}.{cls.__name__} refused the settings: {e}"
    return fused, None


def memory_efficient_options(dtype: torch.dtype) -> dict[str, bool]:
    """Group options for weights kept in ``dtype``: bf16 -> stochastic rounding, no
    master; fp16 -> fp32 masters."""
    return {"master_weights": dtype == torch.float16, "stochastic_rounding": dtype == torch.bfloat16}


def _has_moment_options(cls: type) -> bool:
    return "exp_avg_dtype" in inspect.signature(cls.__init__).parameters


def conversion_overrides(config: MixedPrecisionConfig, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, Any], str | None]:
    """The group options the trainer's conversion sets for ``config``, and a note
    when a requested optimizer-state precision cannot apply (None otherwise).

    memory_efficient's weight options (:func:`memory_efficient_options`) plus the
    moments' dtypes of ``config.resolved_optimizer_state``, for Adam/AdamW only.
    An implied "8bit" (memory_efficient alone) yields to amsgrad, whose running
    max needs fp32 moments; an explicit one is passed on (and refused there).
    """
    overrides = memory_efficient_options(config.dtype) if config.memory_efficient else {}
    state = config.resolved_optimizer_state
    if state is None:
        return overrides, None
    explicit = config.optimizer_state is not None
    cls = type(optimizer) if is_fused(optimizer) else FUSED_OPTIMIZERS.get(type(optimizer))
    if cls is None or not _has_moment_options(cls):
        note = f"optimizer_state={state!r} ignored: {type(optimizer).__name__} keeps no Adam moments"
        return overrides, note if explicit and cls is not None else None
    if not explicit and any(g.get("amsgrad") for g in optimizer.param_groups):
        return overrides, None
    dtype = OPTIMIZER_STATES[state]
    return {**overrides, "exp_avg_dtype": dtype, "exp_avg_sq_dtype": dtype}, None


def state_precision(optimizer: torch.optim.Optimizer) -> str | None:
    """The moments' precision of amp_engine's Adam/AdamW as a config name ("fp32",
    "bf16", "8bit"; "exp_avg=..., exp_avg_sq=..." when they differ, "mixed" across
    groups); None for other optimizers (their state is their own). Params under
    4,096 elements keep fp32 moments whatever this says."""
    if not (is_fused(optimizer) and _has_moment_options(type(optimizer))):
        return None
    names = {dtype: name for name, dtype in OPTIMIZER_STATES.items()}
    found = set()
    for g in optimizer.param_groups:
        pair = (names[g.get("exp_avg_dtype", torch.float32)], names[g.get("exp_avg_sq_dtype", torch.float32)])
        found.add(pair[0] if pair[0] == pair[1] else f"exp_avg={pair[0]}, exp_avg_sq={pair[1]}")
    return found.pop() if len(found) == 1 else "mixed"


def convert_optimizer(config: MixedPrecisionConfig, optimizer: torch.optim.Optimizer, scheduler: Any,
                      logger: logging.Logger) -> torch.optim.Optimizer:
    """The optimizer the trainer steps under ``config``: amp_engine's fused version of
    ``optimizer`` with :func:`conversion_overrides` applied (the scheduler rebound to
    it), or ``optimizer`` itself when nothing changes or it cannot be converted (logged)."""
    overrides, note = conversion_overrides(config, optimizer)
    if note:
        logger.warning("%s", note)
    if is_fused(optimizer) and not overrides:
        return optimizer
    fused, why = to_fused_optimizer(optimizer, **overrides)
    if fused is None:
        logger.warning("fused_optimizer: keeping %s: %s", type(optimizer).__name__, why)
        return optimizer
    logger.info("fused_optimizer: %s replaced by %s.%s (same param groups%s)", type(optimizer).__name__,
                type(fused).__module__, type(fused).__name__, f", {overrides}" if overrides else "")
    if scheduler is not None:
        rebind_scheduler(scheduler, fused)
    return fused


def rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler at ``optimizer`` (the fused replacement of its own).

    torch's LRScheduler wraps its optimizer's ``step`` to check that
    ``optimizer.step()`` runs before ``scheduler.step()``; the replacement gets
    the same wrapper so that check (and its warning) keeps working.
    """
    scheduler.optimizer = optimizer
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return
    opt_ref = weakref.ref(optimizer)
    func = step.__func__

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def low_precision_candidates(model: nn.Module) -> list[nn.Parameter]:
    """fp32 parameters that memory_efficient keeps in low precision (not norm layers')."""
    # a param shared with a norm layer stays fp32
    seen = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    out = []
    for module in model.modules():
        if isinstance(module, _NORM_LAYERS):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen and p.dtype in (torch.float32, torch.float16, torch.bfloat16):
                seen.add(id(p))
                out.append(p)
    return out


@torch.no_grad()
def set_weight_precision(params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                         dtype: torch.dtype) -> None:
    """Store ``params`` in ``dtype`` (fp32 or fp16/bf16), keeping the optimizer consistent.

    To low precision: a param whose optimizer state exists and needs a master gets
    its exact fp32 value as the master (new state makes one lazily). To fp32: the
    param takes its master's value (more precise than the rounded weight) and the
    master is dropped. The Parameter objects stay the same (``.data`` is swapped),
    so optimizer and scheduler references stay valid; grads are dropped.
    """
    chosen = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in chosen or p.dtype == dtype:
                continue
            state = optimizer.state.get(p)
            p.grad = None
            if dtype == torch.float32:
                master = state.pop("master", None) if state else None
                p.data = master if master is not None else p.data.float()
            else:
                if state and is_fused(optimizer) and optimizer.needs_master(p.new_empty(0, dtype=dtype), group):
                    state["master"] = p.data.float().clone()
                p.data = p.data.to(dtype)
    for p in params:  # params the optimizer does not hold (frozen): just cast
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
