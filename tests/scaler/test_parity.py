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


def test_fp16_grads_of_a_plain_optimizer_are_refused_as_torch():
    # torch refuses fp16 grads wherever they would be unscaled in place for an
    # optimizer that steps the fp16 weights directly; ours raises the same error
    errors = {}
    for cls in (torch.amp.GradScaler, GradScaler):
        for how in ("unscale_", "step", "clip"):
            model = torch.nn.Linear(4, 3).half()
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            s = cls("cpu", init_scale=8.0)
            s.scale(model(torch.randn(5, 4).half()).float().pow(2).mean()).backward()
            before = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(ValueError) as info:
                if how == "unscale_":
                    s.unscale_(opt)
                elif how == "step":
                    s.step(opt)
                else:
                    s.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            errors[cls, how] = str(info.value)
            assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert set(errors.values()) == {"Attempting to unscale FP16 gradients."}
    # ours' own clip_grad_norm_ counts as unscale_: the same refusal
    model = torch.nn.Linear(4, 3).half()
    s = GradScaler("cpu", init_scale=8.0)
    s.scale(model(torch.randn(5, 4).half()).float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        s.clip_grad_norm_(torch.optim.SGD(model.parameters(), lr=0.5), 1.0)
