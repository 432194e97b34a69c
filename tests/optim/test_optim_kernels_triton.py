"""The Triton optimizer kernels (amp_engine.ops.triton.optim) against the reference.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py), on CUDA when a GPU
is there. Same operations in the same order, each correctly rounded, no fused
multiply-adds: every comparison is bitwise (NaN == NaN), including the
stochastic-rounding bits, which the reference defines.
"""
from __future__ import annotations

import os

import pytest
import torch

from amp_engine.ops import adam_step_ as adam_entry
from amp_engine.ops.reference import optim as ref
from amp_engine.ops import optim_steps

_reason = optim_steps.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu")
if _reason is not None:
    pytest.skip(f"the Triton backend cannot run here: {_reason}", allow_module_level=True)
from amp_engine.ops.triton import optim as triton_optim  # noqa: E402
from .kernel_cases import (DTYPES, HALF, SIZES, assert_state_equal, make_state,
                                      run)

# CPU tensors only under the interpreter; the GPU only when compiling for real.
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICES = ["cpu"]
else:
    DEVICES = ["cuda"] if torch.cuda.is_available() else []
# on a GPU these are CUDA tests (scripts/gpu_check.sh runs `-m cuda` first)
pytestmark = [pytest.mark.cuda] if DEVICES == ["cuda"] else []
ADAM_KEYS = ("params", "grads", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
             "steps", "rng_state")
SGD_KEYS = ("params", "grads", "masters", "momentum_buffers", "steps", "rng_state")

# (param dtype, masters)
DTYPE_MASTER = [(d, False) for d in DTYPES] + [(d, True) for d in HALF]
ADAM_FLAGS = [
    pytest.param(dict(decoupled=True, weight_decay=0.01, amsgrad=True, maximize=True), id="adamw-ams-max"),
    pytest.param(dict(decoupled=False, weight_decay=0.1), id="adam-l2"),
    pytest.param(dict(decoupled=True, weight_decay=0.0, beta1=0.3, beta2=0.5), id="no-wd-lerp-big-w"),
]
SGD_FLAGS = [
    pytest.param(dict(momentum=0.0, weight_decay=0.01), id="plain-wd"),
    pytest.param(dict(momentum=0.9, dampening=0.1, maximize=True), id="momentum-dampening-max"),
    pytest.param(dict(momentum=0.9, nesterov=True, weight_decay=0.05), id="nesterov-wd"),
]


def _specs(dtype, sizes=SIZES, grad_dtype=None):
    return [(n, dtype, grad_dtype or dtype) for n in sizes]


def _hp(device, *, lr_tensor=False, inv=True, **kw):
    hp = dict(kw)
    if inv:  # grads were multiplied by 1024: the kernel multiplies back
        hp["inv_scale"] = torch.tensor(1 / 1024, device=device)
    if lr_tensor:
        hp["lr_tensor"] = torch.tensor(hp.get("lr", 1e-3), dtype=torch.float64, device=device)
    hp["found_inf"] = torch.zeros((), device=device)
    hp["rng_state"] = torch.tensor([123456789012, 7], device=device)
    return hp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,masters", DTYPE_MASTER)
@pytest.mark.parametrize("flags", ADAM_FLAGS)
def test_adam_matches_reference(device, dtype, masters, flags):
    amsgrad = flags.get("amsgrad", False)
    st = make_state(_specs(dtype), device, masters=masters, amsgrad=amsgrad, grad_scale=1024.0)
    hp = _hp(device, lr_tensor=not masters, **flags)
    want = run("adam", ref.adam_step_, st, hp, device, steps=2)
    got = run("adam", triton_optim.adam_step_, st, hp, device, steps=2)
    assert_state_equal(got, want, ADAM_KEYS)
    assert [float(s) for s in got["steps"]] == [5.0] * len(SIZES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,masters", DTYPE_MASTER)
@pytest.mark.parametrize("flags", SGD_FLAGS)
@pytest.mark.parametrize("step", [0.0, 3.0], ids=["first-step", "later-step"])
def test_sgd_matches_reference(device, dtype, masters, flags, step):
    momentum = flags.get("momentum", 0.0) != 0
    st = make_state(_specs(dtype), device, masters=masters, momentum=momentum, step=step,
                    grad_scale=1024.0)
    hp = _hp(device, lr_tensor=masters, **flags)
    want = run("sgd", ref.sgd_step_, st, hp, device, steps=2)
    got = run("sgd", triton_optim.sgd_step_, st, hp, device, steps=2)
    assert_state_equal(got, want, SGD_KEYS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_mixed_list_one_call(device, op):
    """Many tensors, every (param, grad) dtype pair, ragged sizes: one launch per pair."""
    gen = torch.Generator().manual_seed(1)
    specs = []
    for k in range(48):
        p_dtype, g_dtype = DTYPES[k % 4], DTYPES[(k // 4) % 4]
        specs.append((int(torch.randint(0, 700, (1,), generator=gen)), p_dtype, g_dtype))
    specs[5] = ((33, 65), torch.float16, torch.float32)
    st = make_state(specs, device, amsgrad=True, momentum=True)
    hp = _hp(device, inv=False, weight_decay=0.01, momentum=0.9, amsgrad=op == "adam",
             stochastic_rounding=True)
    fn = (ref.adam_step_, triton_optim.adam_step_) if op == "adam" else (ref.sgd_step_, triton_optim.sgd_step_)
    keys = ADAM_KEYS if op == "adam" else SGD_KEYS
    assert_state_equal(run(op, fn[1], st, hp, device), run(op, fn[0], st, hp, device), keys)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_views(device, layout):
    """Dense permuted views are walked in memory order (the stochastic-rounding offsets
    too), non-dense ones through contiguous copies written back, misaligned ones
    without vector access."""
    specs = [((7, 9), torch.bfloat16, torch.bfloat16), ((31, 5), torch.bfloat16, torch.float16),
             ((1, 1), torch.bfloat16, torch.bfloat16)]
    st = make_state(specs, device, masters=True, amsgrad=True, layout=layout)
    hp = _hp(device, inv=False, amsgrad=True, weight_decay=0.01, stochastic_rounding=True)
    want = run("adam", ref.adam_step_, st, hp, device)
    got = run("adam", triton_optim.adam_step_, st, hp, device)
    assert_state_equal(got, want, ADAM_KEYS)
    mixed = make_state(specs[:2], device, momentum=True, layout=layout)
    mixed["grads"] = [g.contiguous() for g in mixed["grads"]]  # layouts differ: copies
    hp = _hp(device, inv=False, momentum=0.5, stochastic_rounding=True)
    assert_state_equal(run("sgd", triton_optim.sgd_step_, mixed, hp, device),
                       run("sgd", ref.sgd_step_, mixed, hp, device), SGD_KEYS)


@pytest.mark.parametrize("device", DEVICES)
def test_many_chunks(device):
    """65539 elements: several programs per tensor, full blocks and a ragged tail."""
    st = make_state(_specs(torch.bfloat16, [65539, 16384]), device, masters=True)
    hp = _hp(device, inv=False, stochastic_rounding=True)
    assert_state_equal(run("adam", triton_optim.adam_step_, st, hp, device),
                       run("adam", ref.adam_step_, st, hp, device), ADAM_KEYS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", [1.0, 2.0, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_found_inf_changes_nothing(device, flag, op):
    """found_inf != 0 (any non-zero value, NaN included): every tensor bitwise unchanged,
    steps and the rng counter too."""
    specs = _specs(torch.bfloat16, [0, 5, 123]) + _specs(torch.float16, [40])
    st = make_state(specs, device, masters=True, amsgrad=True, momentum=True)
    st["grads"][1][2] = float("nan")
    hp = _hp(device, amsgrad=True, momentum=0.9, stochastic_rounding=True)
    hp["found_inf"].fill_(flag)
    fn = triton_optim.adam_step_ if op == "adam" else triton_optim.sgd_step_
    got = run(op, fn, st, hp, device, steps=3)
    st["rng_state"] = hp["rng_state"]
    assert_state_equal(got, st, ADAM_KEYS if op == "adam" else SGD_KEYS)


@pytest.mark.parametrize("device", DEVICES)
def test_step_and_rng_counters(device):
    """steps += 1 per applied step (one tensor listed twice counts twice, as in the
    reference); the rng counter moves only with stochastic rounding."""
    st = make_state(_specs(torch.float32, [0, 3, 3]), device, momentum=True)
    shared = st["steps"][1]
    st["steps"][2] = shared
    for sr, counter in ((False, 7), (True, 9)):
        hp = _hp(device, inv=False, momentum=0.9, stochastic_rounding=sr)
        got = run("sgd", triton_optim.sgd_step_, st, hp, device, steps=2)
        want = run("sgd", ref.sgd_step_, st, hp, device, steps=2)
        assert_state_equal(got, want, SGD_KEYS)
        assert float(got["steps"][0]) == 5.0 and float(got["steps"][1]) == 7.0
        assert int(got["rng_state"][1]) == counter


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_propagate(device):
    """Without found_inf the step is applied: inf/-inf/NaN in grads, params and
    moments go through the same arithmetic as in the reference."""
    st = make_state(_specs(torch.bfloat16, [5, 123]) + _specs(torch.float32, [9]), device,
                    amsgrad=True)
    st["grads"][0][1], st["grads"][1][7], st["grads"][2][0] = float("inf"), float("-inf"), float("nan")
    st["params"][1][3], st["exp_avg_sqs"][2][4] = float("nan"), float("inf")
    st["max_exp_avg_sqs"][1][9] = float("nan")
    hp = dict(lr=1e-2, amsgrad=True, weight_decay=0.01, stochastic_rounding=True,
              rng_state=torch.tensor([3, 4], device=device))
    assert_state_equal(run("adam", triton_optim.adam_step_, st, hp, device),
                       run("adam", ref.adam_step_, st, hp, device), ADAM_KEYS)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_statistics(device):
    """bf16 stochastic rounding lands on the two bf16 neighbours of the fp32 value,
    unbiased on average, with fresh bits each step (seed, counter) and tensor."""
    n = 1 << 14
    lo = torch.tensor(1.0, dtype=torch.bfloat16).float()
    hi = torch.nextafter(lo.bfloat16(), torch.tensor(2.0, dtype=torch.bfloat16)).float()
    x = float(lo + 0.3 * (hi - lo))  # 30% of the way up: P(hi) = 0.3
    masters = [torch.full((n,), x, device=device), torch.full((n,), x, device=device)]
    params = [m.bfloat16() for m in masters]
    grads = [torch.zeros(n, dtype=torch.bfloat16, device=device) for _ in masters]
    steps = [torch.zeros((), device=device) for _ in masters]
    rng_state = torch.tensor([42, 0], device=device)
    seen = []
    for _ in range(3):  # lr = 0: the master stays x, the param is SR(x) afresh each step
        triton_optim.sgd_step_(params, grads, masters, [], steps, None, 0.0, None, None,
                               rng_state, 0.0, 0.0, 0.0, False, False, True)
        for p in params:
            up = p.float() == hi
            assert bool(((p.float() == lo) | up).all())
            assert abs(up.double().mean().item() - 0.3) < 0.02  # 6 sigma at n = 16384
            seen.append(up.clone())
    assert int(rng_state[1]) == 3
    for a in range(len(seen)):
        for b in range(a):
            assert not torch.equal(seen[a], seen[b])  # new bits per step and per tensor


@pytest.mark.parametrize("device", DEVICES)
def test_public_entry_routes_to_triton(device):
    reason = optim_steps.unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(reason)
    st = make_state(_specs(torch.float16, [5, 17]), device, masters=True)
    hp = _hp(device, inv=False)
    want = run("adam", ref.adam_step_, st, hp, device)
    got = {k: [t.clone() for t in v] for k, v in st.items()}
    adam_entry(got["params"], got["grads"], got["masters"], got["exp_avgs"],
               got["exp_avg_sqs"], [], got["steps"], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0, decoupled=True, found_inf=hp["found_inf"], backend="triton")
    got["rng_state"] = hp["rng_state"]
    assert_state_equal(got, want, ("params", "masters", "exp_avgs", "exp_avg_sqs", "steps"))


@pytest.mark.skipif(not DEVICES, reason="Triton needs TRITON_INTERPRET=1 or a GPU")
def test_empty_list_and_missing_rng_state():
    triton_optim.adam_step_([], [], [], [], [], [], [], None, 1e-3, None, None, None, 0.9, 0.999,
                            1e-8, 0.0, True, False, False, False)
    st = make_state(_specs(torch.bfloat16, [3]), DEVICES[0], masters=True)
    with pytest.raises(ValueError, match="rng_state"):
        triton_optim.sgd_step_(st["params"], st["grads"], st["masters"], [], st["steps"], None,
                               0.1, None, None, None, 0.0, 0.0, 0.0, False, False, True)
