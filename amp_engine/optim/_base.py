"""What every fused master-weight optimizer shares: options, the scaler hand-off,
param collection (DTensor shards included), lazy state and checkpoints.

Scaler hand-off (torch's ``_step_supports_amp_scaling`` protocol, extended): a
scaler sets these optional attributes before calling ``step()`` and deletes
them after; all are 0-dim device tensors, read on the device (no host sync):

* ``grad_scale``: fp32, the grads are still multiplied by it (None: unscaled);
* ``found_inf``: fp32, the step is skipped entirely where it is != 0;
* ``clip_coef``: fp32 clip coefficient to multiply the unscaled grads by.

The kernels get ``inv_scale = clip_coef * float32(1 / float64(grad_scale))``,
computed once per device per step. torch's own GradScaler sets ``grad_scale``
and ``found_inf`` exactly so, hence works with these optimizers as is.

amp_engine's GradScaler passes the same three values as ``step(amp_inputs=(grad_scale,
found_inf, clip_coef))`` instead: no attribute is set on the optimizer, so the step
traces under torch.compile on every supported torch (Dynamo 2.11 refuses a setattr
on a user-defined object inside a compiled region; 2.14 accepts it). To an
optimizer that declares ``_amp_engine_step_scale = True`` (ours) it passes a fourth,
``step_scale``: ``clip_coef / grad_scale`` already on the device (the clip kernel's
output, or the inv_scale update_scale_ wrote), which the kernels then take as
their ``inv_scale`` as it is: no reciprocal or product per step.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from amp_engine.distributed import local_tensor
from amp_engine.ops.dispatch import BACKENDS
from amp_engine.optim import checkpoint as _state

log = logging.getLogger(__name__)

LOW_PRECISION = (torch.float16, torch.bfloat16)



def check_lr(lr: float | Tensor) -> None:
    """lr: a non-negative float or one-element tensor (checked once, at construction)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got {lr.dtype}")
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {float(lr)}; allowed: >= 0")


def lr_on_device(lr: float | Tensor, p: Tensor) -> float | Tensor:
    """A tensor lr on another device than the params is moved once (no sync: H2D async)."""
    if isinstance(lr, Tensor) and lr.device != p.device and lr.device.type != "cpu":
        return lr.to(p.device, non_blocking=True)
    return lr


def moment_dtype(p: Tensor) -> torch.dtype:
    """Moments and buffers are fp32, fp64 for fp64 params."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def to_float(x: Any, name: str) -> float:
    """A float or a one-element tensor as a Python float (construction time only)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x)
    return float(x)


class _AmpInputs:
    """The scaler's device tensors for one step, moved and combined once per device."""

    def __init__(self, optimizer: Optimizer, given: tuple | None) -> None:
        if given is None:  # torch's protocol: attributes set by the scaler
            given = tuple(getattr(optimizer, name, None) for name in ("grad_scale", "found_inf", "clip_coef"))
        elif not isinstance(given, tuple) or len(given) not in (3, 4):
            raise TypeError("amp_inputs must be a tuple (grad_scale, found_inf, clip_coef[, "
                            "step_scale]), got "
                            f"{type(given).__name__}{'' if not isinstance(given, tuple) else f' of {len(given)}'}")
        self.grad_scale, self.found_inf, self.clip_coef = given[:3]
        self.step_scale = given[3] if len(given) == 4 else None
        self._per_device: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}

    def for_device(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(inv_scale, found_inf) on `device`: fp32 one-element tensors or None."""
        if device not in self._per_device:
            for name in ("grad_scale", "found_inf", "clip_coef", "step_scale"):
                value = getattr(self, name)
                if isinstance(value, Tensor) and value.numel() != 1:
                    raise ValueError(f"optimizer.{name} has shape {tuple(value.shape)}; expected a "
                                     "one-element (0-dim) tensor or a float")
            inv = None
            ready = self.step_scale
            have_ready = (isinstance(ready, Tensor) and ready.device == device
                          and ready.dtype == torch.float32)
            if have_ready:  # no op: a 0-dim tensor is used as it is
                inv = ready if ready.dim() == 0 else ready.reshape(())
            elif self.grad_scale is not None:
                gs = torch.as_tensor(self.grad_scale).to(device, non_blocking=True)
                inv = gs.reshape(()).double().reciprocal().float()  # as torch's unscale_
            if self.clip_coef is not None and not have_ready:
                cc = torch.as_tensor(self.clip_coef).to(device, torch.float32, non_blocking=True)
                inv = cc.reshape(()) if inv is None else inv * cc.reshape(())
            fi = None
            if self.found_inf is not None:
                fi = torch.as_tensor(self.found_inf).to(device, torch.float32, non_blocking=True)
            self._per_device[device] = (inv, fi)
        return self._per_device[device]


class FusedOptimizer(Optimizer):
    """Base of amp_engine's fused optimizers (not used directly).

    Subclasses define ``_init_state(state, p, group)`` (moments, buffers) and
    ``_launch(group, lists, inv_scale, found_inf)`` (one fused op call), and
    ``_ELEMENT_STATE``: the per-element state keys kept in fp32 (fp64 for fp64 params).
    """

    _step_supports_amp_scaling = True
    _amp_engine_fused = True
    _amp_engine_step_scale = True  # takes amp_inputs[3], the ready multiplier
    _ELEMENT_STATE: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, master_weights: bool | None,
                 stochastic_rounding: bool, capturable: bool, backend: str | None) -> None:
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {', '.join(BACKENDS)}; got {backend!r}")
        defaults = dict(defaults, master_weights=master_weights,
                        stochastic_rounding=bool(stochastic_rounding), capturable=bool(capturable),
                        differentiable=False)
        self.backend = backend
        super().__init__(params, defaults)

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_group_params(self.param_groups[-1], len(self.param_groups) - 1)
        except (TypeError, ValueError):
            del self.param_groups[-1]  # a refused group leaves the optimizer as it was
            raise
        _state.ensure_rng_state(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def needs_master(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether `p` gets an fp32 master under `group`'s options."""
        if p.dtype not in LOW_PRECISION:
            return False
        mw = group["master_weights"]
        if mw is None:  # default: masters, except bf16 left to stochastic rounding
            return not (group["stochastic_rounding"] and p.dtype == torch.bfloat16)
        return bool(mw)

    # ------------------------------------------------------------ the step
    def _collect(self, group: dict[str, Any], gi: int):
        """Lists for the op, split by ``_split_key(state)`` (whether the param has a
        master; Adam adds the moments' formats): ``{key: lists}``.

        Each ``lists`` maps "params", "grads", "steps", "masters" and every key of
        ``_ELEMENT_STATE`` present to a list of local tensors.
        """
        out: dict[Any, dict[str, list[Tensor]]] = {}
        device = None
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(f"param {i} of group {gi} has a {g.layout} grad; amp_engine "
                                 "optimizers take dense grads only")
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(f"param {i} of group {gi} is on {p.device} but earlier params of "
                                 f"the group are on {device}; put params of different devices in "
                                 "different param groups")
            state = self.state[p]
            if len(state) == 0:
                self._init_base_state(state, p, group)
            has_master = "master" in state
            lists = out.setdefault(self._split_key(state),
                                   {"params": [], "grads": [], "steps": [], "masters": []})
            lists["params"].append(local_tensor(p))
            lists["grads"].append(local_tensor(g))
            lists["steps"].append(local_tensor(state["step"]))
            if has_master:
                lists["masters"].append(local_tensor(state["master"]))
            for key in self._ELEMENT_STATE:
                if key in state:
                    lists.setdefault(key, []).append(local_tensor(state[key]))
        return device, out

    def _split_key(self, state: dict[str, Any]) -> Any:
        """Params whose state gives equal keys go to one op call."""
        return "master" in state

    def _init_base_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        # step lives on the param's device: the kernels read and bump it there (no sync)
        state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
        if self.needs_master(p, group):
            state["master"] = p.detach().to(torch.float32, copy=True)
        self._init_state(state, p, group)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _launch(self, group, lists, inv_scale, found_inf) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None, *, amp_inputs: tuple | None = None):
        """One fused step over every param group (no host sync).

        ``amp_inputs``: ``(grad_scale, found_inf, clip_coef)`` from amp_engine's
        GradScaler (each a 0-dim tensor or None); without it the scaler's
        ``grad_scale`` / ``found_inf`` / ``clip_coef`` attributes are read when
        present (torch's protocol; see the module docstring). Returns the closure's loss.
        """
        # refuses a CUDA graph capture unless capturable=True (torch < 2.13: _cuda_ name)
        getattr(self, "_accelerator_graph_capture_health_check",
                getattr(self, "_cuda_graph_capture_health_check", lambda: None))()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpInputs(self, amp_inputs)
        # every group is collected (and checked) before any is updated: a bad
        # group raises with the params of the others still untouched
        plan = [(group, self._collect(group, gi)) for gi, group in enumerate(self.param_groups)]
        for group, (device, split) in plan:
            if device is None:
                continue
            inv_scale, found_inf = amp.for_device(_local_device(split))
            for lists in split.values():
                self._launch(group, lists, inv_scale, found_inf)
        return loss

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint keeping masters and moments in fp32 (exactly).

        Accepts our own state dicts and torch's (torch.optim.AdamW / Adam / SGD):
        missing masters are rebuilt from the params, with a warning. Everything
        is checked before anything changes; a dict for other params raises ValueError.
        """
        _state.load(self, state_dict, super().load_state_dict)


def _check_group_params(group: dict[str, Any], gi: int) -> None:
    seen: dict[int, int] = {}
    for i, p in enumerate(group["params"]):
        if torch.is_complex(p):
            raise TypeError(f"param {i} of group {gi} is complex ({p.dtype}); amp_engine "
                            "optimizers take real float params")
        if not p.is_floating_point():
            raise TypeError(f"param {i} of group {gi} has dtype {p.dtype}; amp_engine optimizers "
                            "take float32/float16/bfloat16/float64 params")
        first = seen.setdefault(id(p), i)
        if first != i:  # torch only warns; a fused step would update the param twice
            raise ValueError(f"param {i} of group {gi} is the same tensor as param {first}; "
                             "list each parameter once")


def _local_device(split: dict[bool, dict[str, list[Tensor]]]) -> torch.device:
    for lists in split.values():
        return lists["params"][0].device
    return torch.device("cpu")
