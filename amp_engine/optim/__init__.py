"""Fused optimizers with fp32 master weights for fp16/bf16 params.

``AdamW``, ``Adam`` and ``SGD`` are ``torch.optim.Optimizer`` subclasses with
torch's arguments and defaults, plus ``master_weights``, ``stochastic_rounding``,
``capturable`` and ``backend``. Each step is one fused op per param group:
unscale, clip and the overflow skip happen inside it, on the device, without a
host sync (see :mod:`amp_engine.optim._base` for the scaler hand-off).
"""
from amp_engine.optim.adamw import Adam, AdamW
from amp_engine.optim.sgd import SGD

__all__ = ["AdamW", "Adam", "SGD"]
