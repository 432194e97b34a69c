"""amp_engine.GradScaler side by side with torch.amp.GradScaler: same scales, skip
decisions and parameters (bitwise) over 300+ steps with random injected infs."""
import functools

import pytest
import torch

from amp_engine.scaler import GradScaler
from .cases import ContractSGD, assert_same_trajectory, single_thread, trajectory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd-momentum-forloop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "sgd-momentum-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw-forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fp32_trajectory_matches_torch(name):
    opt = OPTIMIZERS[name]
    a = trajectory(torch.amp.GradScaler, [opt], steps=300)
    b = trajectory(GradScaler, [opt], steps=300)
    assert sum(1 for s in a[1] if s[0]) >= 15  # the plan really skips steps
    assert len(set(a[0])) >= 5  # and the scale really moves both ways
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("name", ["sgd-momentum-foreach", "adamw-foreach", "adamw-fused",
                                  "adam-fused"])
def test_bf16_trajectory_matches_torch(name):
    opt = OPTIMIZERS[name]
    a = trajectory(torch.amp.GradScaler, [opt], steps=120, dtype=torch.bfloat16)
    b = trajectory(GradScaler, [opt], steps=120, dtype=torch.bfloat16)
    assert_same_trajectory(a, b)


def test_two_optimizers_share_one_scaler():
    # an overflow in either optimizer's grads skips that one only and backs off the shared scale
    opts = [OPTIMIZERS["sgd-momentum-foreach"], OPTIMIZERS["adamw-fused"]]
    a = trajectory(torch.amp.GradScaler, opts, steps=300)
    b = trajectory(GradScaler, opts, steps=300)
    assert any(s[0] and not s[1] for s in a[1]) and any(s[1] and not s[0] for s in a[1])
    assert_same_trajectory(a, b)


@pytest.mark.parametrize("name", ["adam-foreach", "adamw-fused"])
def test_gradient_accumulation(name):
    a = trajectory(torch.amp.GradScaler, [OPTIMIZERS[name]], steps=100, accumulate=3)
    b = trajectory(GradScaler, [OPTIMIZERS[name]], steps=100, accumulate=3)
    assert_same_trajectory(a, b)


def test_disabled_matches_torch_disabled():
    plan = {}  # a disabled scaler never skips: no injected infs
    a = trajectory(torch.amp.GradScaler, [OPTIMIZERS["adamw-foreach"]], steps=50,
                   enabled=False, plan=plan)
    b = trajectory(GradScaler, [OPTIMIZERS["adamw-foreach"]], steps=50, enabled=False, plan=plan)
    assert a[0] == b[0] == [1.0] * 50
    assert_same_trajectory(a, b)


def test_contract_optimizer_matches_torch_recipe():
    # our fused path (grad_scale + found_inf on the device) vs torch's scaler + plain SGD
    a = trajectory(torch.amp.GradScaler, [OPTIMIZERS["sgd"]], steps=300)
    b = trajectory(GradScaler, [functools.partial(ContractSGD, lr=0.05)], steps=300)
    assert_same_trajectory(a, b)


def test_contract_optimizer_under_torch_scaler():
    # torch's scaler drives our contract too (clip_coef absent = no clipping)
    a = trajectory(torch.amp.GradScaler, [functools.partial(ContractSGD, lr=0.05)], steps=100)
    b = trajectory(GradScaler, [functools.partial(ContractSGD, lr=0.05)], steps=100)
    assert_same_trajectory(a, b)


def test_hysteresis_and_bounds_at_defaults_are_torch():
    kwargs = {"hysteresis": 1, "max_scale": float("inf")}
    a = trajectory(torch.amp.GradScaler, [OPTIMIZERS["adamw-foreach"]], steps=100)
    b = trajectory(GradScaler, [OPTIMIZERS["adamw-foreach"]], steps=100, scaler_kwargs=kwargs)
    assert_same_trajectory(a, b)


def test_fp16_params_reference_path():
    # torch's non-fused path refuses fp16 grads; ours takes them and must agree with
    # torch's arithmetic done by hand (fp32 unscale, rounded to fp16)
    model = torch.nn.Linear(4, 3).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s = GradScaler("cpu", init_scale=8.0)
    x = torch.randn(5, 4).half()
    s.scale(model(x).float().pow(2).mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    s.step(opt)
    s.update()
    inv = torch.tensor(8.0).double().reciprocal().float()
    for p, b, g in zip(model.parameters(), before, grads):
        expected = b.add((g.float() * inv).half(), alpha=-0.5)
        assert torch.equal(p.detach(), expected)
