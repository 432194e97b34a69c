"""The CUDA optimizer kernels (csrc/cuda/adam_step.cu, sgd_step.cu) against the reference.

Skipped without a GPU or without CUDA kernels in the build. The reference runs on
the same GPU: torch's CUDA sqrt, division and pow are the correctly rounded / libdevice
ones the kernels use, and the kernels use no fused multiply-adds, so every comparison
is bitwise (NaN == NaN: torch writes a bf16 NaN as 0x7FFF on CUDA, the kernels as 0x7FC0).
"""
from __future__ import annotations

import pytest
import torch

from amp_engine.ops.reference import optim as ref
from amp_engine.ops import optim_steps
from .kernel_cases import (DTYPES, HALF, SIZES, assert_state_equal, make_state,
                                      run)

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    optim_steps.unavailable_reason("cuda", DEVICE) is not None,
    reason=f"CUDA optimizer kernels not usable: {optim_steps.unavailable_reason('cuda', DEVICE)}")]

ADAM_KEYS = ("params", "grads", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
             "steps", "rng_state")
SGD_KEYS = ("params", "grads", "masters", "momentum_buffers", "steps", "rng_state")
DTYPE_MASTER = [(d, False) for d in DTYPES] + [(d, True) for d in HALF]


def cuda_adam(*args):
    torch.ops.amp_engine.adam_step_(*args)


def cuda_sgd(*args):
    torch.ops.amp_engine.sgd_step_(*args)


def _specs(dtype, sizes=SIZES + [65539], grad_dtype=None):
    return [(n, dtype, grad_dtype or dtype) for n in sizes]


def _hp(*, lr_tensor=False, inv=True, **kw):
    hp = dict(kw)
    if inv:
        hp["inv_scale"] = torch.tensor(1 / 1024, device=DEVICE)
    if lr_tensor:
        hp["lr_tensor"] = torch.tensor(hp.get("lr", 1e-3), device=DEVICE)  # fp32 lr tensor
    hp["found_inf"] = torch.zeros((), device=DEVICE)
    hp["rng_state"] = torch.tensor([-987654321987, 11], device=DEVICE)
    return hp


@pytest.mark.parametrize("dtype,masters", DTYPE_MASTER)
@pytest.mark.parametrize("flags", [
    dict(decoupled=True, weight_decay=0.01, amsgrad=True, maximize=True),
    dict(decoupled=False, weight_decay=0.1, stochastic_rounding=True),
    dict(decoupled=True, beta1=0.3, beta2=0.5, eps=1e-3),
], ids=["adamw-ams-max", "adam-l2-sr", "lerp-big-w"])
def test_adam_matches_reference(dtype, masters, flags):
    st = make_state(_specs(dtype), DEVICE, masters=masters, amsgrad=flags.get("amsgrad", False),
                    grad_scale=1024.0)
    hp = _hp(lr_tensor=masters, **flags)
    want = run("adam", ref.adam_step_, st, hp, DEVICE, steps=2)
    got = run("adam", cuda_adam, st, hp, DEVICE, steps=2)
    assert_state_equal(got, want, ADAM_KEYS)


@pytest.mark.parametrize("dtype,masters", DTYPE_MASTER)
@pytest.mark.parametrize("flags", [
    dict(weight_decay=0.01),
    dict(momentum=0.9, dampening=0.1, maximize=True, stochastic_rounding=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
], ids=["plain-wd", "momentum-dampening-max-sr", "nesterov-wd"])
@pytest.mark.parametrize("step", [0.0, 3.0], ids=["first-step", "later-step"])
def test_sgd_matches_reference(dtype, masters, flags, step):
    st = make_state(_specs(dtype), DEVICE, masters=masters,
                    momentum=flags.get("momentum", 0.0) != 0, step=step, grad_scale=1024.0)
    hp = _hp(lr_tensor=not masters, **flags)
    want = run("sgd", ref.sgd_step_, st, hp, DEVICE, steps=2)
    got = run("sgd", cuda_sgd, st, hp, DEVICE, steps=2)
    assert_state_equal(got, want, SGD_KEYS)


@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_mixed_list_many_launches(op):
    """More tensors than one launch's table holds, every (param, grad) dtype pair,
    ragged sizes, stochastic rounding keyed by the index in the whole call."""
    gen = torch.Generator().manual_seed(2)
    specs = [(int(torch.randint(0, 3000, (1,), generator=gen)), DTYPES[k % 4], DTYPES[(k // 4) % 4])
             for k in range(150)]
    specs[7] = (200_000, torch.bfloat16, torch.float32)  # several chunks of 64k
    st = make_state(specs, DEVICE, amsgrad=True, momentum=True)
    hp = _hp(inv=False, weight_decay=0.01, momentum=0.9, amsgrad=op == "adam",
             stochastic_rounding=True)
    fns = (ref.adam_step_, cuda_adam) if op == "adam" else (ref.sgd_step_, cuda_sgd)
    assert_state_equal(run(op, fns[1], st, hp, DEVICE), run(op, fns[0], st, hp, DEVICE),
                       ADAM_KEYS if op == "adam" else SGD_KEYS)


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_views(layout):
    specs = [((70, 90), torch.bfloat16, torch.bfloat16), ((31, 5), torch.bfloat16, torch.float16)]
    st = make_state(specs, DEVICE, masters=True, amsgrad=True, layout=layout)
    hp = _hp(inv=False, amsgrad=True, weight_decay=0.01, stochastic_rounding=True)
    assert_state_equal(run("adam", cuda_adam, st, hp, DEVICE),
                       run("adam", ref.adam_step_, st, hp, DEVICE), ADAM_KEYS)
    st = make_state(specs, DEVICE, momentum=True, layout=layout)
    st["grads"] = [g.contiguous() for g in st["grads"]]
    hp = _hp(inv=False, momentum=0.5, stochastic_rounding=True)
    assert_state_equal(run("sgd", cuda_sgd, st, hp, DEVICE),
                       run("sgd", ref.sgd_step_, st, hp, DEVICE), SGD_KEYS)


@pytest.mark.parametrize("flag", [1.0, 2.0, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_found_inf_changes_nothing(flag, op):
    st = make_state(_specs(torch.bfloat16, [0, 5, 70000]) + _specs(torch.float32, [40]),
                    DEVICE, amsgrad=True, momentum=True)
    hp = _hp(amsgrad=True, momentum=0.9, stochastic_rounding=True)
    hp["found_inf"].fill_(flag)
    got = run(op, cuda_adam if op == "adam" else cuda_sgd, st, hp, DEVICE, steps=3)
    st["rng_state"] = hp["rng_state"]
    assert_state_equal(got, st, ADAM_KEYS if op == "adam" else SGD_KEYS)


def test_counters_and_non_finite_values():
    st = make_state(_specs(torch.bfloat16, [0, 5, 123]), DEVICE, amsgrad=True)
    st["steps"][2] = st["steps"][1]  # listed twice: counts twice, as in the reference
    st["grads"][1][1], st["grads"][2][7] = float("inf"), float("nan")
    st["max_exp_avg_sqs"][2][9] = float("nan")
    hp = _hp(inv=False, amsgrad=True, stochastic_rounding=True)
    got = run("adam", cuda_adam, st, hp, DEVICE, steps=2)
    assert_state_equal(got, run("adam", ref.adam_step_, st, hp, DEVICE, steps=2), ADAM_KEYS)
    assert [float(s) for s in got["steps"]] == [5.0, 7.0, 7.0]
    assert int(got["rng_state"][1]) == 13


def test_stochastic_rounding_statistics():
    n = 1 << 20
    lo = torch.tensor(1.0, dtype=torch.bfloat16).float()
    hi = torch.nextafter(lo.bfloat16(), torch.tensor(2.0, dtype=torch.bfloat16)).float()
    x = float(lo + 0.3 * (hi - lo))
    masters = [torch.full((n,), x, device=DEVICE)]
    params = [masters[0].bfloat16()]
    grads = [torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)]
    steps = [torch.zeros((), device=DEVICE)]
    rng_state = torch.tensor([42, 0], device=DEVICE)
    cuda_sgd(params, grads, masters, [], steps, None, 0.0, None, None, rng_state, 0.0, 0.0, 0.0,
             False, False, True)
    p = params[0].float()
    assert bool(((p == lo) | (p == hi)).all())
    assert abs((p == hi).double().mean().item() - 0.3) < 0.003  # > 6 sigma at n = 2**20


def test_no_host_sync():
    """found_inf, inv_scale, lr and the counters stay on the device: no synchronization."""
    st = make_state(_specs(torch.float16, [1000]), DEVICE, masters=True, momentum=True)
    hp = _hp(lr_tensor=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_adam(st["params"], st["grads"], st["masters"], st["exp_avgs"], st["exp_avg_sqs"], [],
                  st["steps"], hp["lr_tensor"], 0.0, hp["inv_scale"], hp["found_inf"],
                  hp["rng_state"], 0.9, 0.999, 1e-8, 0.01, True, False, False, False)
        cuda_sgd(st["params"], st["grads"], st["masters"], st["momentum_buffers"], st["steps"],
                 hp["lr_tensor"], 0.0, hp["inv_scale"], hp["found_inf"], hp["rng_state"], 0.9,
                 0.0, 0.0, False, False, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_inputs_name_the_argument():
    st = make_state(_specs(torch.float16, [5]), DEVICE, masters=True)
    with pytest.raises(TypeError, match="exp_avgs"):
        cuda_adam(st["params"], st["grads"], st["masters"], [m.half() for m in st["exp_avgs"]],
                  st["exp_avg_sqs"], [], st["steps"], None, 1e-3, None, None, None, 0.9, 0.999,
                  1e-8, 0.0, True, False, False, False)
    with pytest.raises(ValueError, match="nesterov"):
        cuda_sgd(st["params"], st["grads"], st["masters"], [], st["steps"], None, 0.1, None, None,
                 None, 0.0, 0.0, 0.0, True, False, False)


@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_opcheck(op):
    """Schema (mutated arguments), fake kernel and dispatch agree with the CUDA kernel."""
    st = make_state(_specs(torch.bfloat16, [5, 300]), DEVICE, masters=True, momentum=True)
    hp = _hp(lr_tensor=True, stochastic_rounding=True, momentum=0.9)
    if op == "adam":
        args = (st["params"], st["grads"], st["masters"], st["exp_avgs"], st["exp_avg_sqs"], [],
                st["steps"], hp["lr_tensor"], 0.0, hp["inv_scale"], hp["found_inf"],
                hp["rng_state"], 0.9, 0.999, 1e-8, 0.01, True, False, False, True)
        torch.library.opcheck(torch.ops.amp_engine.adam_step_.default, args)
    else:
        args = (st["params"], st["grads"], st["masters"], st["momentum_buffers"], st["steps"],
                hp["lr_tensor"], 0.0, hp["inv_scale"], hp["found_inf"], hp["rng_state"], 0.9,
                0.0, 0.0, False, False, True)
        torch.library.opcheck(torch.ops.amp_engine.sgd_step_.default, args)
