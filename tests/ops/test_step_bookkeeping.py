"""The step's bookkeeping riding in kernels that run anyway (the op budget, DESIGN.md §5).

grad_norm_and_check(max_norm=...) writes torch's clip coefficient and the step's
grad multiplier; update_scale_ writes the next inv_scale, zeroes the next flag,
counts updates / overflow updates / the last update above the floor and keeps a
snapshot of the overflow counts per overflow. Every backend against torch's own
ops (the clip) or an independent host model (the counters).
"""
import math
import random
import struct

import pytest
import torch

from amp_engine import ops
from .cases import BAD_VALUES, SIZES, scaled_grad
from conftest import backend_params

pytestmark = pytest.mark.parametrize("backend,device", backend_params())


def f32(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


def round_f32(x: float) -> float:
    """x rounded to the nearest fp32 (the host model's arithmetic; numpy is optional)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ------------------------------------------------------------------ clip outputs
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e9])
def test_clip_outputs_are_torch_clip_coef(backend, device, size, max_norm):
    grads = [scaled_grad(size, torch.float32, device), scaled_grad(7, torch.bfloat16, device)]
    inv = f32(1 / 1024.0, device)
    coef, step_scale = f32(-1.0, device), f32(-1.0, device)
    total = ops.grad_norm_and_check(grads, inv, f32(0.0, device), max_norm=max_norm,
                                    clip_coef=coef, step_scale=step_scale, backend=backend)
    # torch.nn.utils.clip_grads_with_norm_'s own expression on the same norm
    expect = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    assert coef.item() == expect.item()
    assert step_scale.item() == (inv * expect).item()
    if max_norm == 1e9:
        assert coef.item() == 1.0 and step_scale.item() == inv.item()


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["inf", "-inf", "nan"])
def test_clip_outputs_of_a_non_finite_norm(backend, device, bad):
    g = scaled_grad(100, torch.float16, device)
    g[3] = bad
    coef, step_scale, found = f32(-1.0, device), f32(-1.0, device), f32(0.0, device)
    total = ops.grad_norm_and_check([g], f32(1.0, device), found, max_norm=1.0, clip_coef=coef,
                                    step_scale=step_scale, backend=backend)
    assert found.item() == 1.0 and not math.isfinite(total.item())
    expect = torch.clamp(1.0 / (total + 1e-6), max=1.0).item()  # 0 for inf, NaN for NaN
    assert (math.isnan(coef.item()) and math.isnan(expect)) or coef.item() == expect
    assert math.isnan(step_scale.item()) == math.isnan(expect)


def test_clip_outputs_with_empty_grads(backend, device):
    coef, step_scale = f32(-1.0, device), f32(-1.0, device)
    total = ops.grad_norm_and_check([], f32(0.25, device), f32(0.0, device), max_norm=2.0,
                                    clip_coef=coef, step_scale=step_scale, backend=backend)
    assert total.item() == 0.0 and coef.item() == 1.0 and step_scale.item() == 0.25


def test_clip_outputs_are_optional(backend, device):
    step_scale = f32(-1.0, device)
    ops.grad_norm_and_check([scaled_grad(50, torch.float32, device)], f32(0.5, device),
                            f32(0.0, device), max_norm=1e9, step_scale=step_scale, backend=backend)
    assert step_scale.item() == 0.5
    before = step_scale.clone()
    ops.grad_norm_and_check([scaled_grad(50, torch.float32, device)], f32(0.5, device),
                            f32(0.0, device), backend=backend)
    assert step_scale.item() == before.item()  # no max_norm: nothing written


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(clip_coef="f32"), ValueError, "max_norm"),
    (dict(max_norm=-1.0), ValueError, "max_norm"),
    (dict(max_norm=1.0, step_scale="i64"), TypeError, "step_scale"),
    (dict(max_norm=1.0, clip_coef="2el"), ValueError, "clip_coef"),
])
def test_clip_argument_errors(backend, device, kwargs, exc, word):
    make = {"f32": lambda: f32(0.0, device),
            "i64": lambda: torch.zeros((), dtype=torch.int64, device=device),
            "2el": lambda: torch.zeros(2, device=device)}
    kwargs = {k: make[v]() if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=word):
        ops.grad_norm_and_check([scaled_grad(5, torch.float32, device)], f32(1.0, device),
                                f32(0.0, device), backend=backend, **kwargs)


# ------------------------------------------------------------- update bookkeeping
def bookkeeping(device, n_counts=4, rows=3):
    return dict(inv_scale=f32(-1.0, device), next_found_inf=f32(1.0, device),
                counters=torch.tensor([0, 0, -1], dtype=torch.int64, device=device),
                counts=torch.zeros(n_counts, dtype=torch.int64, device=device),
                ring=torch.full((rows, n_counts + 1), -7, dtype=torch.int64, device=device))


@pytest.mark.parametrize("n_counts", [0, 1, 5, 300])
def test_update_bookkeeping_follows_the_host_model(backend, device, n_counts):
    rng = random.Random(n_counts)
    rows = 3
    out = bookkeeping(device, n_counts, rows)
    scale = f32(4.0, device)
    gt = torch.zeros((), dtype=torch.int32, device=device)
    ht = torch.ones((), dtype=torch.int32, device=device)
    lo = 0.5
    # the host model: counters, ring rows (by slot) and the expected scale
    u, events, last_above = 0, 0, -1
    ring = {}
    for _ in range(12):
        overflow = bool(rng.random() < 0.5)
        out["counts"] += torch.tensor([rng.randrange(3) for _ in range(n_counts)],
                                      dtype=torch.int64, device=device)
        ring[events % rows] = [u] + out["counts"].tolist()
        before = scale.item()
        ops.update_scale_(scale, gt, ht, f32(float(overflow), device), growth_factor=2.0,
                          backoff_factor=0.5, growth_interval=2, min_scale=lo, **out,
                          backend=backend)
        new = max(before * 0.5, lo) if overflow else scale.item()
        assert scale.item() == new
        events += overflow
        if new > lo:
            last_above = u
        u += 1
        assert out["counters"].tolist() == [u, events, last_above]
        assert out["inv_scale"].item() == round_f32(1.0 / new)
        assert out["next_found_inf"].item() == 0.0
        out["next_found_inf"].fill_(1.0)
        for slot, row in ring.items():
            assert out["ring"][slot].tolist() == row


@pytest.mark.parametrize("flag", [2.0, float("nan")])
def test_any_nonzero_flag_counts_as_overflow(backend, device, flag):
    out = bookkeeping(device)
    s, gt, ht = f32(8.0, device), torch.zeros((), dtype=torch.int32, device=device), \
        torch.ones((), dtype=torch.int32, device=device)
    ops.update_scale_(s, gt, ht, f32(flag, device), growth_factor=2.0, backoff_factor=0.5,
                      growth_interval=10, **out, backend=backend)
    assert out["counters"].tolist() == [1, 1, 0]


def test_each_output_alone(backend, device):
    """Every bookkeeping output is optional; the scale rule is the same with or without them."""
    for key in ("inv_scale", "next_found_inf"):
        out = bookkeeping(device)
        s = f32(2.0**10, device)
        ops.update_scale_(s, torch.zeros((), dtype=torch.int32, device=device),
                          torch.ones((), dtype=torch.int32, device=device), f32(1.0, device),
                          growth_factor=2.0, backoff_factor=0.5, growth_interval=10,
                          **{key: out[key]}, backend=backend)
        assert s.item() == 2.0**9
        assert out[key].item() == {"inv_scale": 2.0**-9, "next_found_inf": 0.0}[key]
    out = bookkeeping(device)
    ops.update_scale_(f32(1.0, device), torch.zeros((), dtype=torch.int32, device=device),
                      torch.ones((), dtype=torch.int32, device=device), f32(0.0, device),
                      growth_factor=2.0, backoff_factor=0.5, growth_interval=10,
                      counters=out["counters"], backend=backend)
    assert out["counters"].tolist() == [1, 0, 0]


@pytest.mark.parametrize("which,bad,word", [
    ("counters", lambda d: torch.zeros(2, dtype=torch.int64, device=d), "counters"),
    ("counters", lambda d: torch.zeros(3, dtype=torch.int32, device=d), "counters"),
    ("ring", lambda d: torch.zeros(3, 4, dtype=torch.int64, device=d), "ring"),
    ("ring", None, "counts and ring"),
    ("inv_scale", lambda d: torch.zeros(2, device=d), "inv_scale"),
    ("next_found_inf", lambda d: torch.zeros((), dtype=torch.float64, device=d), "next_found_inf"),
])
def test_bookkeeping_argument_errors(backend, device, which, bad, word):
    out = bookkeeping(device)
    out[which] = None if bad is None else bad(device)
    with pytest.raises((ValueError, TypeError), match=word):
        ops.update_scale_(f32(1.0, device), torch.zeros((), dtype=torch.int32, device=device),
                          torch.ones((), dtype=torch.int32, device=device), f32(0.0, device),
                          growth_factor=2.0, backoff_factor=0.5, growth_interval=10, **out,
                          backend=backend)
