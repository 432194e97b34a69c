"""Converting torch optimizers to amp_engine's fused ones, and weight precision switches."""
import pytest
import torch
from torch import nn

import amp_engine.optim as fused_optim
from amp_engine.trainer.conversion import low_precision_candidates, set_weight_precision, to_fused_optimizer

from .helpers import CE, InfAt, blobs, make_trainer, mlp, params_of

X, Y = blobs(64)
BATCH = (X[:16], Y[:16])


@pytest.mark.parametrize("make,cls", [
    (lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True),
     fused_optim.AdamW),
    (lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01, maximize=True, foreach=False), fused_optim.Adam),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), fused_optim.SGD),
])
def test_conversion_keeps_groups_and_hyper_parameters(make, cls):
    model = mlp()
    opt = make([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}])
    fused, why = to_fused_optimizer(opt)
    assert why is None and type(fused) is cls
    for old, new in zip(opt.param_groups, fused.param_groups):
        assert [id(p) for p in old["params"]] == [id(p) for p in new["params"]]
        for key, value in old.items():
            if key not in ("params", "foreach", "fused", "differentiable"):
                assert new[key] == value, key


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
])
def test_converted_optimizer_steps_like_torch(make):
    a, b = mlp(), mlp()
    ta = make_trainer(a, make(a.parameters()), enable_amp=False)
    tb = make_trainer(b, make(b.parameters()), enable_amp=False, fused_optimizer=True)
    assert tb.optimizer is not None and type(tb.optimizer).__module__.startswith("amp_engine.optim")
    for i in range(3):
        batch = (X[16 * i:16 * i + 16], Y[16 * i:16 * i + 16])
        ta.train_step(batch, CE, "cpu")
        tb.train_step(batch, CE, "cpu")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_conversion_carries_existing_state():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(X[:8]).sum().backward()
    opt.step()
    fused, why = to_fused_optimizer(opt)
    assert why is None
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[p][key], opt.state[p][key], rtol=0, atol=0)
        assert float(fused.state[p]["step"]) == 1.0


def test_refusals_say_why():
    model = mlp()
    fused, why = to_fused_optimizer(torch.optim.Adagrad(model.parameters()))
    assert fused is None and "Adagrad has no fused counterpart" in why and "torch.optim.AdamW" in why

    class MyAdam(torch.optim.Adam):  # a subclass may change the math: not converted
        pass
    fused, why = to_fused_optimizer(MyAdam(model.parameters()))
    assert fused is None and "MyAdam" in why


def test_torch_fused_optimizer_gets_the_device_side_skip():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    t = make_trainer(model, opt, dtype="fp16")
    before = params_of(model)
    bad = InfAt({0})
    out = t.train_step(BATCH, bad, "cpu")
    assert out["skipped"] and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    out = t.train_step(BATCH, bad, "cpu")
    assert not out["skipped"] and not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_low_precision_candidates_skip_norm_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                          nn.RMSNorm(4), nn.Linear(4, 2).double())
    chosen = {id(p) for p in low_precision_candidates(model)}
    assert chosen == {id(model[0].weight), id(model[0].bias)}  # fp64 stays too


def test_weight_precision_round_trip_keeps_parameters_and_masters():
    model = mlp()
    opt = fused_optim.AdamW(model.parameters(), master_weights=True)
    params = low_precision_candidates(model)
    model(X[:8]).sum().backward()
    opt.step()  # state exists: the switch must add masters itself
    exact = params_of(model)
    set_weight_precision(params, opt, torch.float16)
    assert all(p.dtype == torch.float16 and p.grad is None for p in model.parameters())
    for p, e in zip(model.parameters(), exact):
        assert torch.equal(opt.state[p]["master"], e)  # the exact fp32 value, not the rounded one
    set_weight_precision(params, opt, torch.float32)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), exact))
    assert all("master" not in opt.state[p] for p in model.parameters())
    assert list(model.parameters())[0] is params[0]
