"""The loss scaler: the drop-in GradScaler, its clipping pass, grad bookkeeping,
checkpoint state and overflow statistics.

Layer: above :mod:`amp_engine.ops` and :mod:`amp_engine.distributed`; knows no
trainer. ``GradScaler`` lives in :mod:`amp_engine.scaler.grad_scaler`.
"""
from amp_engine.scaler.grad_scaler import GradScaler, OptState
from amp_engine.scaler.stats import AmpStats

__all__ = ["GradScaler", "OptState", "AmpStats"]
