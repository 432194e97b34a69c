"""Checkpoint logic of the fused optimizers: exact fp32 masters and moments.

torch's ``Optimizer.load_state_dict`` casts every floating state tensor to its
param's dtype, which would silently round an fp32 master (or moment) of a bf16
param to bf16. We take those tensors out before torch's loader runs and put
them back afterwards as fp32 copies on the param's device, so resuming is bitwise
exact. Everything is validated before anything changes.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from amp_engine.distributed import local_tensor

log = logging.getLogger(__name__)

#: per-param state kept in full precision (never cast to the param's dtype)
EXACT_KEYS = ("step", "master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
#: per-element state: same shape as the param
ELEMENT_KEYS = ("master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def ensure_rng_state(group: dict[str, Any]) -> None:
    """Give a stochastic-rounding group its generator: int64 [seed, counter].

    The seed is drawn from torch's default CPU generator (so runs are
    reproducible under ``torch.manual_seed``); the counter advances on the
    device with every applied step. It lives in the param group, so it is saved
    and restored with the optimizer's state dict.
    """
    if not group.get("stochastic_rounding") or isinstance(group.get("rng_state"), Tensor):
        return
    params = group["params"]
    device = params[0].device if params else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    group["rng_state"] = torch.tensor([seed, 0], dtype=torch.int64, device=_local_device(device, params))


def _local_device(device: torch.device, params) -> torch.device:
    return local_tensor(params[0]).device if params else device


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate(optimizer, state_dict: dict[str, Any]) -> None:
    """Raise ValueError (nothing changed) unless `state_dict` fits the optimizer's params."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' "
                         "(what Optimizer.state_dict() returns)")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(state_dict["state"], dict):
        raise ValueError("state_dict['param_groups'] must be a list and state_dict['state'] a dict")
    if len(groups) != len(saved_groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups but the optimizer has "
                         f"{len(groups)}")
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            raise ValueError(f"param group {gi} of the state dict must be a dict with a 'params' list")
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"param group {gi} of the state dict has {len(sg['params'])} params but "
                             f"the optimizer's has {len(g['params'])}")
        _check_group(gi, sg, optimizer.defaults)
    id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    for k, st in state_dict["state"].items():
        if k not in id_map:
            continue
        p = id_map[k]
        if not isinstance(st, dict):
            raise ValueError(f"state of param {k} is a {type(st).__name__}; expected a dict")
        for key in ELEMENT_KEYS:
            t = st.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"state[{k}][{key!r}] must be a floating tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
            if _shape(t) != _shape(p):
                raise ValueError(f"state[{k}][{key!r}] has shape {_shape(t)} but param {k} has shape "
                                 f"{_shape(p)}: this state dict belongs to other params")
        missing = [key for key in getattr(optimizer, "_REQUIRED_STATE", ()) if key not in st]
        if st and missing:
            raise ValueError(f"state[{k}] has no {missing}: the checkpoint is incomplete or from "
                             f"another optimizer than {type(optimizer).__name__}")
        if "step" in st and not _is_number(st["step"]):
            raise ValueError(f"state[{k}]['step'] must be a number or a one-element real tensor, got "
                             f"{_describe(st['step'])}")


def _is_number(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and (x.is_floating_point() or x.dtype in (torch.int32, torch.int64))
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _describe(x: Any) -> str:
    return f"a {x.dtype} tensor of shape {_shape(x)}" if isinstance(x, Tensor) else repr(x)


#: hyper-parameters that must be numbers >= 0 when a saved group has them
_NON_NEGATIVE = ("lr", "eps", "weight_decay", "momentum")


def _check_group(gi: int, saved: dict[str, Any], defaults: dict[str, Any]) -> None:
    """The saved group's hyper-parameters have the types the step needs (ValueError)."""
    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"param group {gi} of the state dict has {key}={_describe(saved[key])}; "
                          f"expected {want}")

    for key, default in defaults.items():
        if key not in saved or key == "params":
            continue
        value = saved[key]
        if key in _NON_NEGATIVE:
            if not _is_number(value) or not float(value) >= 0.0:
                raise bad(key, "a number >= 0")
        elif key == "betas":
            if not (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(_is_number(b) and 0.0 <= float(b) < 1.0 for b in value)):
                raise bad(key, "a pair of numbers in [0, 1)")
        elif key == "master_weights":
            if value not in (None, True, False):
                raise bad(key, "None, True or False")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise bad(key, "True or False")
    rng = saved.get("rng_state")
    if rng is not None and not (isinstance(rng, Tensor) and rng.dtype == torch.int64
                                and _shape(rng) == (2,)):
        raise bad("rng_state", "an int64 tensor of shape (2,) (seed, counter)")


def load(optimizer, state_dict: dict[str, Any], torch_load: Callable[[dict], None]) -> None:
    """Validate, run torch's loader on everything but the exact state, restore that in fp32."""
    validate(optimizer, state_dict)
    saved_groups = state_dict["param_groups"]
    id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                      chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    exact: dict[Any, dict[str, Tensor]] = {}
    stripped: dict[Any, Any] = {}
    for k, st in state_dict["state"].items():
        if k in id_map and isinstance(st, dict):
            exact[k] = {key: st[key] for key in EXACT_KEYS if isinstance(st.get(key), Tensor)}
            stripped[k] = {key: v for key, v in st.items() if key not in exact[k]}
        else:
            stripped[k] = st
    old_rng = [g.get("rng_state") for g in optimizer.param_groups]
    torch_load(dict(state_dict, state=stripped))

    rebuilt = dropped = 0
    for k, tensors in exact.items():
        p = id_map[k]
        state = optimizer.state[p]
        state.pop("master", None)
        for key, t in tensors.items():
            dtype = torch.float32 if key in ("step", "master") else _moment_dtype(p)
            state[key] = t.detach().to(device=p.device, dtype=dtype, copy=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in optimizer.state or len(optimizer.state[p]) == 0:
                continue
            r, d = _fix_param_state(optimizer, optimizer.state[p], p, group)
            rebuilt, dropped = rebuilt + r, dropped + d
    for group, rng in zip(optimizer.param_groups, old_rng):
        saved = group.get("rng_state")
        if isinstance(saved, Tensor):
            group["rng_state"] = saved.to(device=_local_device(saved.device, group["params"]),
                                          dtype=torch.int64, copy=True)
        elif rng is not None:
            group["rng_state"] = rng
        ensure_rng_state(group)
    if rebuilt:
        warnings.warn(f"{type(optimizer).__name__}.load_state_dict: the state dict has no fp32 "
                      f"masters for {rebuilt} float16/bfloat16 params (a torch.optim checkpoint?); "
                      "rebuilt them from the params, so their lost low-order bits stay lost",
                      UserWarning, stacklevel=3)
    if dropped:
        log.info("load_state_dict: dropped %d fp32 masters that this optimizer does not keep", dropped)


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _fix_param_state(optimizer, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> tuple[int, int]:
    """Bring one param's loaded state to what the kernels expect; (rebuilt, dropped) masters."""
    rebuilt = dropped = 0
    if state.get("momentum_buffer", 0) is None:  # torch SGD's "no buffer yet"
        del state["momentum_buffer"]
    if "step" not in state:  # torch SGD keeps no step: a buffer means it has stepped
        state["step"] = torch.tensor(1.0 if "momentum_buffer" in state else 0.0)
    step = state["step"]
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step))
    state["step"] = step.detach().reshape(()).to(device=local_tensor(p).device, dtype=torch.float32, copy=True)
    wants = optimizer.needs_master(p, group)
    if wants and "master" not in state:
        state["master"] = p.detach().to(torch.float32, copy=True)
        rebuilt = 1
    elif not wants and "master" in state:
        del state["master"]
        dropped = 1
    optimizer._complete_state(state, p, group)
    return rebuilt, dropped
