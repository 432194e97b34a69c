"""Fused SGD (momentum, dampening, nesterov) with fp32 master weights."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amp_engine.ops.optim_steps import sgd_step_
from amp_engine.optim._base import FusedOptimizer, check_lr, lr_on_device, moment_dtype


class SGD(FusedOptimizer):
    """SGD (torch.optim.SGD's arguments, defaults and formulas), fused.

    Master weights, the scaler hand-off, stochastic rounding, ``capturable`` and
    ``backend`` work as in :class:`amp_engine.optim.Adam`. State per param:
    ``step`` (fp32 0-dim on the param's device; torch's SGD keeps none: ours
    decides on the device whether a momentum buffer is still to be initialised,
    so a skipped first step leaves nothing half-initialised), ``momentum_buffer``
    (fp32, fp64 for fp64 params; only when momentum != 0) and ``master``.
    """

    _ELEMENT_STATE = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        master_weights: bool | None = None,
        stochastic_rounding: bool = False,
        backend: str | None = None,
    ) -> None:
        check_lr(lr)
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}; allowed: >= 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; allowed: >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("differentiable=True is not supported by amp_engine's fused optimizers")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, capturable=capturable,
                         backend=backend)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        self._complete_state(state, p, group)

    def _complete_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            # a fresh buffer is set to the grad at the next applied step (step == 0)
            state["momentum_buffer"] = torch.zeros_like(p, dtype=moment_dtype(p),
                                                        memory_format=torch.preserve_format)
            state["step"].zero_()

    def _launch(self, group, lists, inv_scale, found_inf) -> None:
        momentum = group["momentum"]
        sgd_step_(
            lists["params"], lists["grads"], lists["masters"],
            lists.get("momentum_buffer", []) if momentum != 0 else [], lists["steps"],
            lr=lr_on_device(group["lr"], lists["params"][0]), momentum=momentum,
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"], inv_scale=inv_scale,
            found_inf=found_inf, rng_state=group.get("rng_state"),
            stochastic_rounding=group["stochastic_rounding"], backend=self.backend,
        )


__all__ = ["SGD"]
