"""Inputs and checks shared by the optimizer-kernel tests (Triton and CUDA backends).

A *state* is a dict of the lists the ops take (params, grads, masters, moments,
steps). ``run_adam`` / ``run_sgd`` run one backend on a deep copy of a state,
so the reference and a kernel see the same inputs.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

from amp_engine.ops.reference import optim as optim_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 5, 123, 4097]
HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_param(shape, dtype, device, gen, *, layout: str = "contiguous") -> torch.Tensor:
    """Normal values in `dtype` on `device`; layout 'contiguous', 'transposed' (dense,
    permuted; 2-D shapes), 'strided' (every other element: not dense) or 'offset'
    (dense, 2 bytes past a 16-byte boundary at most: misaligned for vector access)."""
    shape = tuple(shape)
    numel = math.prod(shape) if shape else 1
    if layout == "transposed" and len(shape) == 2:
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64)
        return base.to(dtype).to(device).t()
    if layout == "strided":
        base = torch.randn(2 * numel, generator=gen, dtype=torch.float64)
        return base.to(dtype).to(device)[::2].view(shape) if numel else base.to(dtype)[:0].view(shape)
    if layout == "offset":
        base = torch.randn(numel + 1, generator=gen, dtype=torch.float64)
        return base.to(dtype).to(device)[1:].view(shape)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def make_state(specs, device="cpu", *, masters=False, amsgrad=False, momentum=False,
               step=3.0, seed=0, grad_scale=1.0, layout="contiguous") -> dict:
    """specs: [(shape, param dtype, grad dtype)]; every tensor in `layout`.
    Moments/buffers in the acc dtype (fp64 for fp64 params, else fp32)."""
    gen = torch.Generator().manual_seed(seed)
    st = {k: [] for k in ("params", "grads", "masters", "exp_avgs", "exp_avg_sqs",
                          "max_exp_avg_sqs", "momentum_buffers", "steps")}
    for shape, p_dtype, g_dtype in specs:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        acc = acc_dtype(p_dtype)

        def rnd(dtype):
            return make_param(shape, dtype, device, gen, layout=layout)

        p = rnd(p_dtype)
        if masters:  # a master that is not representable in the param's dtype
            st["masters"].append(rnd(torch.float32))
            p.copy_(st["masters"][-1])
        st["params"].append(p)
        st["grads"].append(rnd(g_dtype).mul_(grad_scale))
        st["exp_avgs"].append(rnd(acc).mul_(0.1))
        st["exp_avg_sqs"].append(rnd(acc).square_().mul_(0.01))
        if amsgrad:
            st["max_exp_avg_sqs"].append(rnd(acc).square_().mul_(0.01))
        if momentum:
            st["momentum_buffers"].append(rnd(acc).mul_(0.1))
        st["steps"].append(torch.tensor(step, device=device))
    return st


def _adam_args(st, hp):
    return (st["params"], st["grads"], st["masters"], st["exp_avgs"], st["exp_avg_sqs"],
            st["max_exp_avg_sqs"], st["steps"], hp.get("lr_tensor"), hp.get("lr", 1e-3),
            hp.get("inv_scale"), hp.get("found_inf"), hp.get("rng_state"), hp.get("beta1", 0.9),
            hp.get("beta2", 0.999), hp.get("eps", 1e-8), hp.get("weight_decay", 0.0),
            hp.get("decoupled", True), hp.get("amsgrad", False), hp.get("maximize", False),
            hp.get("stochastic_rounding", False))


def _sgd_args(st, hp):
    return (st["params"], st["grads"], st["masters"], st["momentum_buffers"], st["steps"],
            hp.get("lr_tensor"), hp.get("lr", 1e-2), hp.get("inv_scale"), hp.get("found_inf"),
            hp.get("rng_state"), hp.get("momentum", 0.0), hp.get("dampening", 0.0),
            hp.get("weight_decay", 0.0), hp.get("nesterov", False), hp.get("maximize", False),
            hp.get("stochastic_rounding", False))


def _ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    import numpy as np  # CPU only, i.e. under the Triton interpreter, which needs numpy too

    return torch.from_numpy(np.asarray(np.sqrt(x.numpy()))).reshape(x.shape)


@contextlib.contextmanager
def ieee_sqrt_on_cpu(device: str):
    """torch's CPU sqrt is not correctly rounded (1 ulp off for ~1% of fp64 and ~20% of
    fp32 inputs here, AVX-512 build); the kernels' is (IEEE, as torch's CUDA sqrt).
    The reference is run with numpy's IEEE sqrt on CPU so the comparison can be bitwise."""
    if device != "cpu":
        yield
        return
    real = torch.sqrt
    torch.sqrt = _ieee_sqrt
    try:
        yield
    finally:
        torch.sqrt = real


def run(op: str, fn, state: dict, hp: dict, device: str = "cpu", steps: int = 1) -> dict:
    """Run fn (reference or kernel launcher) `steps` times on a copy of state and hp."""
    st, hp = copy.deepcopy((state, hp))
    args = _adam_args(st, hp) if op == "adam" else _sgd_args(st, hp)
    with ieee_sqrt_on_cpu(device) if fn.__module__ == optim_reference.__name__ else \
            contextlib.nullcontext():
        for _ in range(steps):
            fn(*args)
    st["rng_state"] = hp.get("rng_state")
    return st


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().reshape(-1).view(view)


def assert_state_equal(got: dict, want: dict, keys=None) -> None:
    """Bitwise equal, NaN == NaN (NaN payloads may differ between backends)."""
    for k in keys or want:
        if want[k] is None:
            assert got[k] is None, k
            continue
        ws = want[k] if isinstance(want[k], list) else [want[k]]
        gs = got[k] if isinstance(got[k], list) else [got[k]]
        assert len(gs) == len(ws), k
        for i, (g, w) in enumerate(zip(gs, ws)):
            assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), (k, i)
            g, w = g.cpu(), w.cpu()
            nan = torch.isnan(w) if w.is_floating_point() else torch.zeros_like(w, dtype=torch.bool)
            if w.is_floating_point():
                assert torch.equal(torch.isnan(g), nan), f"{k}[{i}]: NaN positions differ"
            same = bits(g) == bits(w)
            ok = same | nan.reshape(-1)
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0])
                raise AssertionError(f"{k}[{i}] differs at {int((~ok).sum())} of {ok.numel()} "
                                     f"elements, first at {j}: {g.reshape(-1)[j].item()!r} vs "
                                     f"{w.reshape(-1)[j].item()!r} (reference)")
