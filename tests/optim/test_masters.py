"""fp32 masters for fp16/bf16 params: accuracy against an fp64 run, against bf16
training without masters, and stochastic rounding (unbiased, reproducible)."""
import math

import pytest
import torch

from amp_engine import ops
from amp_engine.optim import SGD, AdamW

from .cases import ALL, backend_params

BACKENDS = backend_params(ALL)
N, STEPS = 2048, 100


def grad_sequence(steps=STEPS, n=N, seed=0):
    """Grads representable in bf16 and fp16, so every run sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    drift = torch.randn(n, generator=gen) * 0.5
    seq = []
    for _ in range(steps):
        g = ((drift + torch.randn(n, generator=gen)) * 0.01).bfloat16().half().bfloat16().float()
        assert torch.equal(g, g.half().float()) and torch.equal(g, g.bfloat16().float())
        seq.append(g)
    return seq


def run(dtype, seq, *, opt_cls=AdamW, backend=None, **kw):
    """Final (param, master or None) after training one param vector on `seq`."""
    gen = torch.Generator().manual_seed(1)
    init = (1.0 + torch.rand(N, generator=gen)).bfloat16().half()  # exact in every dtype
    p = torch.nn.Parameter(init.to(dtype))
    if dtype == torch.float64:
        opt = (torch.optim.AdamW if opt_cls is AdamW else torch.optim.SGD)([p], foreach=False, **kw)
    else:
        opt = opt_cls([p], backend=backend, **kw)
    for g in seq:
        p.grad = g.to(dtype)
        opt.step()
    master = opt.state[p].get("master") if dtype != torch.float64 else None
    return p.detach(), master


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_cls,kw", [(AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
                                        (SGD, {"lr": 0.05, "momentum": 0.9})])
def test_master_error_within_2x_of_fp32(backend, device, dtype, opt_cls, kw):
    seq = grad_sequence()
    truth, _ = run(torch.float64, seq, opt_cls=opt_cls, **kw)
    p32, _ = run(torch.float32, seq, opt_cls=opt_cls, backend=backend, **kw)
    p_low, master = run(dtype, seq, opt_cls=opt_cls, backend=backend, **kw)
    err32 = (p32.double() - truth).abs().max()
    err_master = (master.double() - truth).abs().max()
    assert err_master <= 2 * err32, (float(err_master), float(err32))
    # the param is its master rounded to nearest: within half an ulp of its dtype
    assert torch.equal(p_low, master.to(dtype))
    half_ulp = truth.abs() * torch.finfo(dtype).eps / 2
    assert bool(((p_low.double() - truth).abs() <= half_ulp + 2 * err32).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masters_far_better_than_bf16_without_master(backend, device):
    """bf16 params without a master lose every update smaller than half a bf16 ulp
    (lr 1e-3 on weights in [1, 2) where the ulp is 2**-7): training stalls."""
    seq = grad_sequence()
    kw = {"lr": 1e-3, "weight_decay": 0.1}
    truth, _ = run(torch.float64, seq, **kw)
    _, master = run(torch.bfloat16, seq, backend=backend, **kw)
    plain, _ = run(torch.bfloat16, seq, backend=backend, master_weights=False, **kw)
    sr, _ = run(torch.bfloat16, seq, backend=backend, stochastic_rounding=True, **kw)
    err_master = (master.double() - truth).abs().mean()
    err_plain = (plain.double() - truth).abs().mean()
    err_sr = (sr.double() - truth).abs().mean()
    assert err_plain > 100 * err_master, (float(err_plain), float(err_master))
    # stochastic rounding keeps bf16-only training unbiased: far better than nearest
    assert err_sr < err_plain / 2, (float(err_sr), float(err_plain))


def _sr_many(backend, x: float, n: int, steps: int, seed: int = 123):
    """bf16 params written from an fp32 master holding x (lr = 0), n elements, `steps` times."""
    p = torch.zeros(n, dtype=torch.bfloat16)
    master = torch.full((n,), x, dtype=torch.float32)
    rng = torch.tensor([seed, 0])
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        ops.sgd_step_([p], [torch.zeros(n)], [master], [], [torch.zeros(())], lr=0.0,
                      rng_state=rng, stochastic_rounding=True, backend=backend)
        total += p.double()
    return total / steps, rng


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.97])
def test_stochastic_rounding_unbiased(backend, device, frac):
    lo = 1.0 + 5 * 2.0**-7  # a bf16 number; the next one is lo + 2**-7
    x = float(torch.tensor(lo + frac * 2.0**-7, dtype=torch.float32))
    n = 1 << 17 if backend in ("cpp", "cuda") else 1 << 14  # python backends are slow
    mean, rng = _sr_many(backend, x, n, steps=4)
    values = set(torch.unique(mean * 4).tolist())
    assert mean.min() >= lo and mean.max() <= lo + 2.0**-7  # only the two neighbours
    # P(up) = frac: the mean over n*4 roundings is within 5 standard errors of x
    sigma = 2.0**-7 * math.sqrt(frac * (1 - frac) / (n * 4))
    assert abs(float(mean.mean()) - x) < 5 * sigma + 1e-12, (float(mean.mean()), x, sigma)
    assert len(values) > 1
    assert rng.tolist() == [123, 4]  # the counter advanced once per applied step


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_over_steps_of_one_value(backend, device):
    x = float(torch.tensor(1.0 + 0.25 * 2.0**-7, dtype=torch.float32))
    mean, _ = _sr_many(backend, x, 8, steps=4000)
    sigma = 2.0**-7 * math.sqrt(0.25 * 0.75 / 4000)
    assert float((mean - x).abs().max()) < 5 * sigma


def test_stochastic_rounding_reproducible_under_seed():
    def train(seed):
        torch.manual_seed(seed)
        p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
        opt = SGD([p], lr=1e-3, stochastic_rounding=True)
        for g in grad_sequence(5, 1000):
            p.grad = g.bfloat16()
            opt.step()
        return p.detach().clone()

    assert torch.equal(train(3), train(3))
    assert not torch.equal(train(3), train(4))
