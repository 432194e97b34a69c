"""Triton implementations of the ops (GPU; CPU tensors under TRITON_INTERPRET=1).

Imported only when the "triton" backend is used: nothing here is imported by
``import amp_engine``. :mod:`~amp_engine.ops.triton.scaling` (unscale/check,
norm/check, scale update), :mod:`~amp_engine.ops.triton.optim` (optimizer step
launchers) and :mod:`~amp_engine.ops.triton.optim_kernels` (their kernels).
"""
