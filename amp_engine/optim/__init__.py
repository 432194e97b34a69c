"""Fused optimizers with fp32 master weights for fp16/bf16 params.

``AdamW``, ``Adam`` and ``SGD`` are ``torch.optim.Optimizer`` subclasses with
torch's arguments and defaults, plus ``master_weights``, ``stochastic_rounding``,
``capturable`` and ``backend``. Each step is one fused op per param group:
unscale, clip and the overflow skip happen inside it, on the device, without a
host sync (see :mod:`amp_engine.optim._base` for the scaler hand-off).
Adam / AdamW keep their moments in fp32, bf16 or 8-bit blocks (``exp_avg_dtype``,
``exp_avg_sq_dtype``; ``AdamW8bit`` = both 8-bit): :mod:`amp_engine.optim._moments`.
"""
from amp_engine.optim.adamw import Adam, AdamW, AdamW8bit
from amp_engine.optim.sgd import SGD

__all__ = ["AdamW", "Adam", "AdamW8bit", "SGD"]
