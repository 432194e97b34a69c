"""update_scale_: bitwise torch._amp_update_scale_ at defaults; hysteresis and bounds rules."""
import math
import random
import struct

import pytest
import torch

from amp_engine import ops
from conftest import backend_params

pytestmark = pytest.mark.parametrize("backend,device", backend_params())


def state(device, scale, hysteresis=1):
    return (torch.full((), scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
            torch.full((), hysteresis, dtype=torch.int32, device=device))


def f32(x: float) -> float:
    """x rounded to the nearest fp32 (inf beyond its range): the host model's arithmetic."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def model_step(s, gt, ht, inf, *, growth, backoff, interval, hysteresis, lo, hi):
    """An independent host model of the documented rule, in float32 (struct rounding)."""
    if inf:
        ht = ht - 1
        if ht <= 0:
            s = max(f32(float(s) * backoff), f32(lo))
            ht = 0
        return f32(s), 0, ht
    ht = hysteresis
    if gt + 1 >= interval:
        new = f32(float(s) * growth)
        if math.isfinite(new):
            s = min(new, f32(hi)) if math.isfinite(f32(hi)) else new
        return f32(s), 0, ht
    return s, gt + 1, ht


@pytest.mark.parametrize("interval", [1, 3, 50])
def test_equals_torch_amp_update_scale(backend, device, interval):
    rng = random.Random(interval)
    mine = state(device, 2.0**16)
    theirs = (mine[0].clone(), mine[1].clone())
    for _ in range(600):
        found = torch.tensor(float(rng.random() < {1: 0.3, 3: 0.1, 50: 0.02}[interval]), device=device)
        ops.update_scale_(*mine, found, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=interval, backend=backend)
        torch._amp_update_scale_(theirs[0], theirs[1], found, 2.0, 0.5, interval)
        assert mine[0].item() == theirs[0].item() and mine[1].item() == theirs[1].item()
        assert mine[0].item() >= ops.DEFAULT_MIN_SCALE  # bounds not reached: the comparison is fair


def test_odd_factors_round_like_torch(backend, device):
    mine = state(device, 3.0e4)
    theirs = (mine[0].clone(), mine[1].clone())
    for i in range(40):
        found = torch.tensor(float(i % 3 == 0), device=device)
        ops.update_scale_(*mine, found, growth_factor=1.7, backoff_factor=0.3, growth_interval=2,
                          backend=backend)
        torch._amp_update_scale_(theirs[0], theirs[1], found, 1.7, 0.3, 2)
        assert mine[0].item() == theirs[0].item()


@pytest.mark.parametrize("hysteresis", [1, 2, 4])
def test_hysteresis_rule(backend, device, hysteresis):
    rng = random.Random(hysteresis)
    s, gt, ht = state(device, 1024.0, hysteresis)
    m = (f32(1024.0), 0, hysteresis)
    for _ in range(300):
        inf = rng.random() < 0.5
        ops.update_scale_(s, gt, ht, torch.tensor(float(inf), device=device), growth_factor=2.0,
                          backoff_factor=0.5, growth_interval=4, hysteresis=hysteresis,
                          min_scale=1.0, max_scale=2.0**20, backend=backend)
        m = model_step(*m, inf, growth=2.0, backoff=0.5, interval=4, hysteresis=hysteresis,
                       lo=1.0, hi=2.0**20)
        assert (s.item(), gt.item(), ht.item()) == (float(m[0]), m[1], m[2])


def test_hysteresis_tolerates_isolated_spikes(backend, device):
    s, gt, ht = state(device, 512.0, hysteresis=3)
    for inf in [1, 1, 0, 1, 1, 0, 1, 1, 0]:  # never 3 in a row
        ops.update_scale_(s, gt, ht, torch.tensor(float(inf), device=device), growth_factor=2.0,
                          backoff_factor=0.5, growth_interval=100, hysteresis=3, backend=backend)
    assert s.item() == 512.0
    for _ in range(3):  # 3 in a row: backs off on the third
        ops.update_scale_(s, gt, ht, torch.tensor(1.0, device=device), growth_factor=2.0,
                          backoff_factor=0.5, growth_interval=100, hysteresis=3, backend=backend)
    assert s.item() == 256.0


def test_floor_stops_collapse(backend, device):
    """Persistent NaN: torch reaches exactly 0 after ~166 back-offs; ours stops at the floor."""
    s, gt, ht = state(device, 2.0**16)
    t_s, t_gt = s.clone(), gt.clone()
    nan = torch.tensor(1.0, device=device)
    for _ in range(200):
        ops.update_scale_(s, gt, ht, nan, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=3, backend=backend)
        torch._amp_update_scale_(t_s, t_gt, nan, 2.0, 0.5, 3)
    assert t_s.item() == 0.0  # the torch fault we do not copy
    assert s.item() == f32(ops.DEFAULT_MIN_SCALE) > 0
    clean = torch.tensor(0.0, device=device)
    for _ in range(3):
        ops.update_scale_(s, gt, ht, clean, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=3, backend=backend)
    assert s.item() == 2 * f32(ops.DEFAULT_MIN_SCALE)


def test_ceiling_and_never_inf(backend, device):
    s, gt, ht = state(device, 2.0**14)
    clean = torch.tensor(0.0, device=device)
    for _ in range(5):
        ops.update_scale_(s, gt, ht, clean, growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=1, max_scale=2.0**16, backend=backend)
    assert s.item() == 2.0**16
    s.fill_(3.0e38)
    ops.update_scale_(s, gt, ht, clean, growth_factor=2.0, backoff_factor=0.5, growth_interval=1,
                      backend=backend)
    assert s.item() == f32(3.0e38)


@pytest.mark.parametrize("flag", [2.0, 0.5, float("nan")])
def test_any_nonzero_flag_is_overflow(backend, device, flag):
    s, gt, ht = state(device, 64.0)
    ops.update_scale_(s, gt, ht, torch.tensor(flag, device=device), growth_factor=2.0,
                      backoff_factor=0.5, growth_interval=10, backend=backend)
    assert s.item() == 32.0 and gt.item() == 0


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(growth_factor=1.0), ValueError, "growth_factor"),
    (dict(backoff_factor=1.0), ValueError, "backoff_factor"),
    (dict(backoff_factor=0.0), ValueError, "backoff_factor"),
    (dict(growth_interval=0), ValueError, "growth_interval"),
    (dict(hysteresis=0), ValueError, "hysteresis"),
    (dict(min_scale=0.0), ValueError, "min_scale"),
    (dict(min_scale=4.0, max_scale=2.0), ValueError, "max_scale"),
])
def test_bad_arguments(backend, device, kwargs, exc, word):
    args = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=10)
    args.update(kwargs)
    s, gt, ht = state(device, 64.0)
    with pytest.raises(exc, match=word):
        ops.update_scale_(s, gt, ht, torch.tensor(0.0, device=device), backend=backend, **args)
    assert s.item() == 64.0


@pytest.mark.parametrize("which,bad,exc", [
    (0, lambda d: torch.ones((), dtype=torch.float64, device=d), TypeError),
    (1, lambda d: torch.zeros((), dtype=torch.int64, device=d), TypeError),
    (2, lambda d: torch.zeros((), dtype=torch.float32, device=d), TypeError),
    (3, lambda d: torch.zeros(2, device=d), ValueError),
])
def test_bad_tensors(backend, device, which, bad, exc):
    args = list(state(device, 64.0)) + [torch.tensor(0.0, device=device)]
    args[which] = bad(device)
    name = ["scale", "growth_tracker", "hysteresis_tracker", "found_inf"][which]
    with pytest.raises(exc, match=name):
        ops.update_scale_(*args, growth_factor=2.0, backoff_factor=0.5, growth_interval=10,
                          backend=backend)
