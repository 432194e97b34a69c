"""Checkpoints: masters and moments stay fp32, resume is bitwise exact, torch's state
dicts load (masters rebuilt, with a warning), a dict for other params changes nothing."""
import io

import pytest
import torch

from amp_engine.optim import SGD, Adam, AdamW

from .cases import ALL, backend_params

BACKENDS = backend_params(ALL)


def model(dtype, seed=0, mixed=True):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    m[0].to(dtype)
    if mixed:
        m[2].to(torch.float32 if dtype != torch.float32 else torch.float16)
    else:
        m[2].to(dtype)
    return m


def train(m, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for p in m.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        opt.step()


def save(m, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, buf)
    return buf.getvalue()


def load(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


MAKERS = [
    ("adamw", lambda ps, be: AdamW(ps, lr=1e-3, backend=be)),
    ("adam_amsgrad", lambda ps, be: Adam(ps, lr=1e-3, amsgrad=True, weight_decay=0.01, backend=be)),
    ("sgd", lambda ps, be: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, backend=be)),
    ("adamw_sr", lambda ps, be: AdamW(ps, lr=1e-3, stochastic_rounding=True, backend=be)),
    ("sgd_sr", lambda ps, be: SGD(ps, lr=1e-2, momentum=0.5, stochastic_rounding=True, backend=be)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,make", MAKERS, ids=[n for n, _ in MAKERS])
def test_resume_is_bitwise_exact(backend, device, dtype, name, make):
    torch.manual_seed(5)
    m = model(dtype)
    opt = make(m.parameters(), backend)
    train(m, opt, 3, seed=1)
    blob = save(m, opt)
    train(m, opt, 4, seed=2)  # never stopped

    torch.manual_seed(6)  # a different seed: the SR generator must come from the checkpoint
    m2 = model(dtype, seed=9)
    opt2 = make(m2.parameters(), backend)
    ck = load(blob)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optim"])
    train(m2, opt2, 4, seed=2)
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        for key, v in opt.state[p1].items():
            assert torch.equal(v, opt2.state[p2][key]), key
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        if "rng_state" in g1:
            assert torch.equal(g1["rng_state"], g2["rng_state"])


def test_masters_and_moments_stay_fp32_after_load():
    m = model(torch.bfloat16)
    opt = AdamW(m.parameters())
    train(m, opt, 2, seed=0)
    sd = opt.state_dict()
    opt2 = AdamW(model(torch.bfloat16).parameters())
    opt2.load_state_dict(load(save(m, opt))["optim"])
    for st, st2 in zip(sd["state"].values(), opt2.state.values()):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            if key in st:
                assert st2[key].dtype == torch.float32
                assert torch.equal(st2[key], st[key])  # no bf16 round trip
                assert st2[key].data_ptr() != st[key].data_ptr()  # a copy, not the dict's


def test_load_torch_adamw_state_dict_rebuilds_masters():
    m = model(torch.bfloat16)
    ref = torch.optim.AdamW(m.parameters(), lr=1e-3)
    train(m, ref, 3, seed=0)
    opt = AdamW(m.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="rebuilt them from the params"):
        opt.load_state_dict(ref.state_dict())
    w = m[0].weight
    st = opt.state[w]
    assert st["master"].dtype == torch.float32 and torch.equal(st["master"], w.float())
    assert st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], ref.state[w]["exp_avg"].float())
    assert float(st["step"]) == 3.0 and st["step"].device == w.device
    train(m, opt, 2, seed=1)  # it continues
    assert float(opt.state[w]["step"]) == 5.0


def test_torch_loads_our_fp32_state_dict():
    m = model(torch.float32, mixed=False)
    opt = AdamW(m.parameters(), lr=1e-3)
    train(m, opt, 3, seed=0)
    sd = load(save(m, opt))["optim"]  # torch's loader aliases the dict's tensors: a copy
    ref = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False)
    ref.load_state_dict(sd)
    m2 = model(torch.float32, mixed=False)
    m2.load_state_dict(m.state_dict())
    train(m, ref, 2, seed=1)
    opt2 = AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(load(save(m, opt))["optim"])
    train(m2, opt2, 2, seed=1)
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_load_torch_sgd_state_dict():
    m = model(torch.float32, mixed=False)
    ref = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    train(m, ref, 2, seed=0)
    opt = SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ref.state_dict())
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())  # buffers in use
    m2 = model(torch.float32, mixed=False)
    m2.load_state_dict(m.state_dict())
    ref2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, foreach=False)
    ref2.load_state_dict(ref.state_dict())
    train(m, opt, 2, seed=1)
    train(m2, ref2, 2, seed=1)
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change", ["shape", "count", "groups"])
def test_state_dict_for_other_params_changes_nothing(change):
    m = model(torch.bfloat16)
    opt = AdamW(m.parameters())
    train(m, opt, 2, seed=0)
    other = {"shape": torch.nn.Sequential(torch.nn.Linear(10, 13), torch.nn.ReLU(),
                                          torch.nn.Linear(13, 3)),
             "count": torch.nn.Linear(10, 12),
             "groups": model(torch.bfloat16)}[change]
    other_opt = AdamW(other.parameters()) if change != "groups" else AdamW(
        [{"params": other[0].parameters()}, {"params": other[2].parameters()}])
    train(other, other_opt, 1, seed=0)
    before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    groups_before = opt.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="shape|params|param groups"):
        opt.load_state_dict(other_opt.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == groups_before
    for k, v in before.items():
        for kk, vv in v.items():
            assert torch.equal(after["state"][k][kk], vv)


def test_bad_state_value_raises():
    m = model(torch.float32)
    opt = AdamW(m.parameters())
    train(m, opt, 1, seed=0)
    sd = opt.state_dict()
    sd["state"][0] = dict(sd["state"][0], exp_avg=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating"):
        opt.load_state_dict(sd)
