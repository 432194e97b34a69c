"""Fused Adam and AdamW with fp32 master weights for fp16/bf16 params."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amp_engine.ops.optim_steps import adam_step_
from amp_engine.optim._base import FusedOptimizer, check_lr, lr_on_device, moment_dtype, to_float


class Adam(FusedOptimizer):
    """Adam (torch.optim.Adam's arguments, defaults and formulas), fused.

    One call per param group (and per master/no-master split) updates every
    param: each grad is read once in its own dtype and multiplied on the device
    by the scaler's ``clip_coef / grad_scale``; if the scaler's ``found_inf`` is
    != 0 nothing changes (params, masters, moments, step). No host sync.

    Args:
        params: iterable of params or param-group dicts (fp32/fp16/bf16/fp64; one
            device per group).
        lr: float or one-element tensor (kept on the params' device to be read there).
        betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam.
        decoupled_weight_decay: True gives AdamW.
        master_weights: None (default) = fp32 masters for fp16/bf16 params (except
            bf16 params under stochastic rounding); True / False = always / never
            for fp16/bf16 params. fp32 params never need one.
        stochastic_rounding: write bf16 params with unbiased stochastic rounding
            (for bf16 training without masters). Seeded from torch's generator,
            checkpointed in the param group (``rng_state``).
        capturable: the step is always sync-free with step counters on the
            device; with True a CUDA graph capture of ``step()`` is allowed (a float
            lr is then baked into the graph: use a tensor lr to change it).
        backend: None (fastest built) or "cuda" / "triton" / "cpp" / "reference".
        foreach, fused: accepted for drop-in compatibility, ignored (always fused).
        differentiable: must be False.
    State per param: ``step`` (fp32 0-dim on the param's device), ``exp_avg``,
    ``exp_avg_sq`` (``max_exp_avg_sq``) in fp32 (fp64 for fp64 params), and
    ``master`` (fp32) for params that keep one.
    """

    _ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _REQUIRED_STATE = ("step", "exp_avg", "exp_avg_sq")  # a checkpoint without them is broken

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | None = None,
        stochastic_rounding: bool = False,
        backend: str | None = None,
    ) -> None:
        check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = to_float(betas[0], "betas[0]"), to_float(betas[1], "betas[1]")
        for i, b in enumerate((b1, b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}; allowed: [0, 1)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}; allowed: >= 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; allowed: >= 0")
        if differentiable:
            raise ValueError("differentiable=True is not supported by amp_engine's fused optimizers")
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, capturable=capturable,
                         backend=backend)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        dtype = moment_dtype(p)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _complete_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        dtype = moment_dtype(p)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _launch(self, group, lists, inv_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        adam_step_(
            lists["params"], lists["grads"], lists["masters"], lists["exp_avg"],
            lists["exp_avg_sq"], lists.get("max_exp_avg_sq", []) if amsgrad else [],
            lists["steps"], lr=lr_on_device(group["lr"], lists["params"][0]), beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"], amsgrad=amsgrad, maximize=group["maximize"],
            inv_scale=inv_scale, found_inf=found_inf, rng_state=group.get("rng_state"),
            stochastic_rounding=group["stochastic_rounding"], backend=self.backend,
        )


class AdamW(Adam):
    """AdamW (torch.optim.AdamW's arguments and defaults: weight_decay=1e-2), fused.

    See :class:`Adam` for the fused-step, master-weight and scaler behaviour.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | None = None,
        stochastic_rounding: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, differentiable=differentiable,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, backend=backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch: loading any state keeps AdamW decoupled
            group["decoupled_weight_decay"] = True


__all__ = ["Adam", "AdamW"]
