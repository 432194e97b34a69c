"""Plain-torch references of every op: the truth every backend is tested against.

:mod:`~amp_engine.ops.reference.scaling` (unscale/check, norm/check, scale update)
and :mod:`~amp_engine.ops.reference.optim` (the fused optimizer steps).
"""
