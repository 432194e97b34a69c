"""The scaler hand-off: grad_scale / found_inf / clip_coef as device tensors, read in
the step (torch's GradScaler and ours), overflow skips, and no host sync."""
import copy

import pytest
import torch

from amp_engine.optim import SGD, Adam, AdamW

from .cases import ALL, backend_params

BACKENDS = backend_params(ALL)
MAKERS = {
    "adamw": lambda ps, be: AdamW(ps, lr=1e-2, backend=be),
    "adam_amsgrad": lambda ps, be: Adam(ps, lr=1e-2, amsgrad=True, backend=be),
    "sgd": lambda ps, be: SGD(ps, lr=1e-2, momentum=0.9, backend=be),
    "adamw_sr": lambda ps, be: AdamW(ps, lr=1e-2, stochastic_rounding=True, backend=be),
}


def model(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return m.to(dtype)


def snapshot(m, opt):
    params = [p.detach().clone() for p in m.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()]
    groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items()
               if k != "params"} for g in opt.param_groups]
    return params, state, groups


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1]):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]), k
    for gx, gy in zip(a[2], b[2]):
        for k in gx:
            v, w = gx[k], gy[k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def loss_of(m, x):
    return m(x).float().pow(2).mean()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_torch_grad_scaler_skips_on_overflow(backend, device, dtype, name):
    m = model(dtype)
    opt = MAKERS[name](m.parameters(), backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 8).to(dtype)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(loss_of(m, x)).backward()
        if step == 2:
            m[0].weight.grad[0, 0] = float("inf")
            before = snapshot(m, opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert_same(snapshot(m, opt), before)  # params, masters, moments, steps, rng
            assert scaler.get_scale() == 2.0**9
    assert all(float(opt.state[p]["step"]) == 3.0 for p in m.parameters())
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("found", [2.0, float("nan"), -1.0])
def test_any_nonzero_found_inf_skips(backend, device, found):
    # torch's fused optimizers skip only on exactly 1.0; found_inf summed over devices
    # or ranks can be 2.0
    m = model(torch.float32)
    opt = AdamW(m.parameters(), backend=backend)
    loss_of(m, torch.randn(3, 8)).backward()
    before = snapshot(m, opt)
    opt.found_inf = torch.tensor(found)
    opt.step()
    assert all(len(opt.state[p]) == 0 or float(opt.state[p]["step"]) == 0 for p in m.parameters())
    for x, y in zip(before[0], m.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scale_and_clip_coef_applied_in_the_step(backend, device):
    """grad * (clip_coef * fp32(1 / fp64(grad_scale))) in the kernel, bitwise the same as
    stepping with fp32 grads multiplied by that factor beforehand."""
    scale, clip = torch.tensor(3.0 * 2**12), torch.tensor(0.37)
    factor = clip * scale.double().reciprocal().float()
    runs = []
    for handoff in (True, False):
        m = model(torch.float32)
        opt = AdamW(m.parameters(), lr=1e-2, backend=backend)
        loss_of(m, torch.randn(5, 8, generator=torch.Generator().manual_seed(0))).backward()
        if handoff:
            opt.grad_scale, opt.clip_coef, opt.found_inf = scale, clip, torch.tensor(0.0)
        else:
            for p in m.parameters():
                p.grad = p.grad * factor
        opt.step()
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scaled_equals_unscaled(backend, device):
    """With a power-of-two scale the hand-off gives exactly the unscaled step."""
    results = []
    for use_scaler in (True, False):
        m = model(torch.bfloat16)
        opt = SGD(m.parameters(), lr=1e-2, momentum=0.9, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(loss_of(m, torch.randn(4, 8, generator=gen).bfloat16())).backward()
            scaler.step(opt)
            scaler.update()
        results.append([opt.state[p]["master"].clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unscale_then_clip_then_step(backend, device):
    """The torch recipe unscale_ -> clip_grad_norm_ -> step: grad_scale is None then."""
    m = model(torch.float32)
    opt = AdamW(m.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    scaler.scale(loss_of(m, torch.randn(4, 8))).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
    grads = [p.grad.clone() for p in m.parameters()]
    scaler.step(opt)
    m2 = model(torch.float32)
    opt2 = AdamW(m2.parameters(), backend=backend)
    for p, g in zip(m2.parameters(), grads):
        p.grad = g
    opt2.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_step_never_reads_device_values(monkeypatch):
    """No .item() / bool() / float() on a tensor inside step(): nothing syncs."""
    m = model(torch.bfloat16)
    opt = AdamW([{"params": m[0].parameters(), "lr": torch.tensor(1e-3)},
                 {"params": m[2].parameters()}], stochastic_rounding=True)
    loss_of(m, torch.randn(3, 8).bfloat16()).backward()
    opt.step()  # lazy state creation may read host values once

    def refuse(*_a, **_k):
        raise AssertionError("host read of a tensor inside step()")

    # the same step without the scaler's tensors: grads pre-multiplied by
    # clip_coef / grad_scale = 0.0625 (a power of two: exact in bf16)
    m_ref = copy.deepcopy(m)
    opt_ref = AdamW([{"params": m_ref[0].parameters(), "lr": torch.tensor(1e-3)},
                     {"params": m_ref[2].parameters()}], stochastic_rounding=True)
    opt_ref.load_state_dict(opt.state_dict())
    for p, q in zip(m.parameters(), m_ref.parameters()):
        q.grad = p.grad * 0.0625
    before = [p.detach().clone() for p in m.parameters()]

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.grad_scale, opt.found_inf, opt.clip_coef = torch.tensor(8.0), torch.tensor(0.0), torch.tensor(0.5)
    opt.step()
    monkeypatch.undo()

    opt_ref.step()
    assert any(not torch.equal(a, b) for a, b in zip(m.parameters(), before))  # it stepped
    for a, b in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)  # with the scaler's grad_scale and clip_coef applied


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_skipped_first_step_leaves_no_half_initialised_buffer(backend, device):
    """torch's fused SGD fault: after a skipped first step its momentum buffer is never
    initialised. Ours decides on the device (step counter 0): the next applied step
    starts the buffer from the grad, exactly like an SGD that never saw the skip."""
    runs = []
    for skip_first in (True, False):
        m = model(torch.float32)
        opt = SGD(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
        gen = torch.Generator().manual_seed(0)
        if skip_first:
            loss_of(m, torch.randn(4, 8)).backward()
            opt.found_inf = torch.tensor(1.0)
            opt.step()
            del opt.found_inf
        for _ in range(3):
            opt.zero_grad()
            loss_of(m, torch.randn(4, 8, generator=gen)).backward()
            opt.step()
        runs.append([p.detach().clone() for p in m.parameters()])
    ref = model(torch.float32)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ref_opt.zero_grad()
        loss_of(ref, torch.randn(4, 8, generator=gen)).backward()
        ref_opt.step()
    for a, b, c in zip(*runs, ref.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amp_engine_grad_scaler_with_clipping(dtype):
    """amp_engine.GradScaler.clip_grad_norm_ hands clip_coef to our step: the same
    result as torch's unscale_ -> clip_grad_norm_ -> step on our optimizer, and an
    overflow skips everything."""
    from amp_engine.scaler import GradScaler

    runs = []
    for ours in (True, False):
        m = model(dtype)
        opt = AdamW(m.parameters(), lr=1e-2)
        scaler = (GradScaler if ours else torch.amp.GradScaler)("cpu", init_scale=2.0**8)
        gen = torch.Generator().manual_seed(0)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(loss_of(m, torch.randn(4, 8, generator=gen).to(dtype))).backward()
            if step == 1:
                m[2].bias.grad[0] = float("nan")
                before = snapshot(m, opt)
            if ours:
                scaler.clip_grad_norm_(opt, 0.05)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
            if step == 1:
                assert_same(snapshot(m, opt), before)
        runs.append([opt.state[p].get("master", p).detach().clone() for p in m.parameters()])
    # ours rounds grad * (inv_scale * clip_coef) once in fp32; torch's recipe rounds the
    # grads in their own dtype after unscale_ and again after clipping (bf16: 2**-9
    # relative each), which moves an Adam update of size lr by ~0.1-0.5 %
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-4)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **tol)
