"""Fused Adam and AdamW with fp32 master weights for fp16/bf16 params."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amp_engine.ops.compact_steps import adam_step_compact_
from amp_engine.ops.optim_steps import adam_step_
from amp_engine.optim import _moments
from amp_engine.optim._base import FusedOptimizer, check_lr, lr_on_device, moment_dtype, to_float

_FULL = (torch.float32, torch.float64)


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
            Compact moments run the same choice of backend
            (:mod:`amp_engine.ops.compact_steps`).
        exp_avg_dtype, exp_avg_sq_dtype: the moments' storage: torch.float32 (default),
            torch.bfloat16 (nearest-even) or torch.uint8 (8-bit blocks of 256 with an
            fp32 absmax each: ~2.03 B/param for both). Params under 4,096 elements,
            fp64 and DTensor params keep full-precision moments
            (:mod:`amp_engine.optim._moments`). Not with amsgrad (ValueError).
        foreach, fused: accepted for drop-in compatibility, ignored (always fused).
        differentiable: must be False.
    State per param: ``step`` (fp32 0-dim on the param's device), ``exp_avg``,
    ``exp_avg_sq`` (``max_exp_avg_sq``) in fp32 (fp64 for fp64 params) or the
    chosen compact format (8-bit: uint8 codes plus ``exp_avg_absmax`` /
    ``exp_avg_sq_absmax``), and ``master`` (fp32) for params that keep one.
    """

    _ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") + _moments.ABSMAX_KEYS
    _OWN_GROUP_KEYS = ("exp_avg_dtype", "exp_avg_sq_dtype")  # the optimizer's, kept on load
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
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_lr(lr)
        exp_avg_dtype = _moments.check_dtype("exp_avg_dtype", exp_avg_dtype)
        exp_avg_sq_dtype = _moments.check_dtype("exp_avg_sq_dtype", exp_avg_sq_dtype)
        if amsgrad and (exp_avg_dtype, exp_avg_sq_dtype) != (torch.float32, torch.float32):
            raise ValueError("amsgrad=True needs fp32 moments; got exp_avg_dtype="
                             f"{exp_avg_dtype}, exp_avg_sq_dtype={exp_avg_sq_dtype} (the running "
                             "max of a quantized exp_avg_sq would compound its rounding)")
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
                        decoupled_weight_decay=decoupled_weight_decay,
                        exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype)
        super().__init__(params, defaults, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, capturable=capturable,
                         backend=backend)

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        self._complete_state(state, p, group)

    def _complete_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        _moments.conform(state, p, group)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype(p),
                                                       memory_format=torch.preserve_format)

    def _split_key(self, state: dict[str, Any]) -> Any:
        return ("master" in state, state["exp_avg"].dtype, state["exp_avg_sq"].dtype)

    def fp32_state_dict(self) -> dict[str, Any]:
        """This optimizer's state in torch.optim.AdamW / Adam's format: moments
        decoded to fp32 (fp64 stays fp64), no masters, absmax or amp_engine group keys.
        ``torch.optim.AdamW(params).load_state_dict(opt.fp32_state_dict())`` continues
        the run with torch (our optimizers load it back too)."""
        return _moments.fp32_state_dict(self)

    def _launch(self, group, lists, inv_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        if lists["exp_avg"][0].dtype not in _FULL or lists["exp_avg_sq"][0].dtype not in _FULL:
            adam_step_compact_(
                lists["params"], lists["grads"], lists["masters"], lists["exp_avg"],
                lists["exp_avg_sq"], lists.get("exp_avg_absmax", []),
                lists.get("exp_avg_sq_absmax", []), lists["steps"],
                lr=lr_on_device(group["lr"], lists["params"][0]), beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
                inv_scale=inv_scale, found_inf=found_inf, rng_state=group.get("rng_state"),
                stochastic_rounding=group["stochastic_rounding"], backend=self.backend)
            return
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
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, differentiable=differentiable,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, backend=backend,
                         exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch: loading any state keeps AdamW decoupled
            group["decoupled_weight_decay"] = True


class AdamW8bit(AdamW):
    """AdamW with 8-bit block-wise moments (``exp_avg_dtype = exp_avg_sq_dtype =
    torch.uint8``): ~2.03 B/param of optimizer state instead of 8. Arguments as
    :class:`AdamW`; the two dtypes may still be overridden."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 exp_avg_dtype: torch.dtype = torch.uint8,
                 exp_avg_sq_dtype: torch.dtype = torch.uint8, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype, **kwargs)


__all__ = ["Adam", "AdamW", "AdamW8bit"]
