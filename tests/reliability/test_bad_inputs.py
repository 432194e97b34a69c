"""The bad-input table (docs/bad_inputs.md), one test per row, at the public API
(GradScaler, the fused optimizers, the trainer; the op-level checks are in
tests/ops/test_op_errors.py and tests/optim/test_step_errors.py).

Each row raises an exception naming the argument and leaves everything as it
was, or is handled correctly: never a crash, a hang or wrong numbers.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import amp_engine
from amp_engine import ops
from amp_engine.ops import available_backends, optim_backends
from amp_engine.ops.reference.optim import round_bf16_stochastic, sr_bits
from amp_engine.optim import SGD, AdamW

from .faults import mlp, mse, snapshot
from .test_resume import assert_bitwise_equal


def _scaled_backward(model, scaler, dtype=torch.float32):
    x = torch.randn(8, 8, dtype=dtype)
    scaler.scale(mse(model(x), torch.zeros(8, 4))).backward()


def _extra_param(dtype, grad=True):
    p = nn.Parameter(torch.ones(3, dtype=dtype), requires_grad=dtype.is_floating_point)
    if grad:
        p.grad = torch.ones(3, dtype=dtype)
    return p


# ---------------------------------------------------------------- integer / complex grads
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_integer_or_complex_grads(dtype):
    model = mlp(torch.float32, 0)
    bad = _extra_param(dtype)
    with pytest.raises(TypeError, match=rf"param 2 of group 0 .*{dtype}|complex"):
        AdamW(list(model.parameters())[:2] + [bad])  # refused at construction, by index
    opt = torch.optim.SGD(list(model.parameters()) + [bad], lr=0.1)  # torch's takes it
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0)
    _scaled_backward(model, scaler)
    before = snapshot(model, opt), [p.grad.clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(TypeError, match=rf"grad of param SGD#0.param_groups\[0\]\[4\].*{dtype}"):
        scaler.step(opt)
    after = snapshot(model, opt), [p.grad.clone() for p in opt.param_groups[0]["params"]]
    assert_bitwise_equal(before, after)  # no grad was unscaled either


# ---------------------------------------------------------------- sparse grads
# torch 2.11's clip_grad_norm_ fails on sparse grads (no SparseCPU _foreach_norm); our
# sparse fallback is torch's recipe, so it fails there the same way (2.14.1: works)
@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.14",
                    reason=f"torch {torch.__version__}: clip_grad_norm_ fails on sparse grads (no "
                    "SparseCPU _foreach_norm), in torch's recipe and in our sparse fallback alike")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_grads(dtype):
    emb = nn.Embedding(10, 3, sparse=True).to(dtype)
    idx = torch.tensor([1, 2, 2, 7])
    with pytest.raises(ValueError, match="param 0 of group 0 has a torch.sparse_coo grad"):
        opt = SGD(emb.parameters(), lr=0.1)
        emb(idx).float().sum().backward()
        opt.step()
    # torch's optimizers: handled as torch's scaler (fp16 coalesced, values checked and unscaled)
    emb.weight.grad = None
    ref = emb.weight.detach().clone()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = amp_engine.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(emb(idx).float().sum()).backward()
    if dtype == torch.float16:  # no fp32 master behind the param: refused, as torch refuses
        for s in (scaler, torch.amp.GradScaler("cpu", init_scale=1024.0)):
            s.scale(torch.ones(()))
            with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
                s.unscale_(opt)
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
            scaler.clip_grad_norm_(opt, 1e9)
        assert emb.weight.grad.is_sparse and torch.equal(emb.weight.detach(), ref)
        return
    norm = scaler.clip_grad_norm_(opt, 1e9)  # sparse: torch's recipe, same result
    scaler.step(opt)
    scaler.update()
    expected = ref.float().index_add(0, idx, torch.full((4, 3), -0.1))
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(emb.weight.detach().float(), expected, **tol)
    assert math.isclose(float(norm), math.sqrt(3 * (1 + 4 + 1)), rel_tol=1e-3)


# ---------------------------------------------------------------- mixed devices in one group
def test_mixed_devices_in_one_group():
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3, device="meta"))  # a second device on a CPU-only machine
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = AdamW([a, b])
    with pytest.raises(ValueError, match="param 1 of group 0 is on meta .* on cpu"):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and not opt.state[a].get("exp_avg", torch.zeros(1)).any()
    with pytest.raises(ValueError, match="one device"):
        ops.unscale_and_check_([a.grad, b.grad], torch.ones(()), torch.zeros(()))
    # one group per device is the supported form; the first group is not updated either
    c = nn.Parameter(torch.ones(3))
    c.grad = torch.ones(3)
    opt = AdamW([{"params": [c]}, {"params": [a, b]}])
    with pytest.raises(ValueError, match="group 1"):
        opt.step()
    assert torch.equal(c, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_groups_through_the_scaler():
    model = mlp(torch.float32, 0)
    model[2].cuda()
    opt = AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    scaler = amp_engine.GradScaler("cuda", init_scale=4.0)
    out = model[2](torch.tanh(model[0](torch.randn(8, 8))).cuda())
    scaler.scale(out.float().pow(2).mean()).backward()
    model[0].weight.grad[0, 0] = math.inf  # on the CPU group: both groups skip
    before = snapshot(model, opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.last_step_skipped
    assert_bitwise_equal(before, snapshot(model, opt))


# ---------------------------------------------------------------- params without grad / None grads
def test_params_without_grad():
    model = mlp(torch.float32, 0)
    model[0].weight.requires_grad_(False)  # frozen: never gets a grad
    unused = nn.Parameter(torch.ones(5))  # in the optimizer, never in the forward
    opt = AdamW(list(model.parameters()) + [unused], lr=0.1)
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0)
    frozen = model[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        _scaled_backward(model, scaler)
        scaler.step(opt)
        scaler.update()
    assert torch.equal(model[0].weight, frozen) and torch.equal(unused, torch.ones(5))
    assert model[0].weight not in opt.state and unused not in opt.state  # no state made
    assert float(opt.state[model[2].weight]["step"]) == 3.0


def test_none_grads():
    p = nn.Parameter(torch.ones(3))
    fused, plain = AdamW([p]), torch.optim.AdamW([p])
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    scaler.scale(torch.ones(()))
    scaler.step(fused)  # no grad at all: nothing to check, nothing changes
    scaler.update()  # counted as a clean step
    assert torch.equal(p, torch.ones(3)) and len(fused.state) == 0 and scaler.get_scale() == 8.0
    scaler.scale(torch.ones(()))
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(plain)  # torch's message and behaviour for non-fused optimizers
    with pytest.raises(ValueError, match=r"grads\[1\] is None"):
        ops.unscale_and_check_([torch.ones(2), None], torch.ones(()), torch.zeros(()))


# ---------------------------------------------------------------- empty param groups
@pytest.mark.parametrize("backend", optim_backends("cpu"))
def test_empty_param_groups(backend):
    p = nn.Parameter(torch.ones(3))
    opt = AdamW([{"params": []}, {"params": [p], "lr": 0.5}], backend=backend)
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0)
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert float(opt.state[p]["step"]) == 1.0 and (p < 1).all()
    ops.adam_step_([], [], [], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                   weight_decay=0.0, decoupled=True, backend=backend)  # nothing to do


# ---------------------------------------------------------------- duplicated params
def test_duplicated_params():
    p = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate"), \
            pytest.raises(ValueError, match="param 1 of group 0 is the same tensor as param 0"):
        AdamW([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdamW([{"params": [p]}, {"params": [p]}])
    opt = AdamW([p])
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))] * 2})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    # torch's optimizers (torch warns): the scaler unscales a duplicated grad once, so the
    # result is torch's own without AMP (which applies the listed-twice update twice)
    results = []
    for scaler in (None, amp_engine.GradScaler("cpu", init_scale=4.0)):
        q = nn.Parameter(torch.ones(3))
        with pytest.warns(UserWarning, match="duplicate"):
            opt = torch.optim.SGD([q, q], lr=0.1)
        loss = (q * 2).sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        opt.step() if scaler is None else scaler.step(opt)
        results.append(q.detach().clone())
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------- non-contiguous params
@pytest.mark.parametrize("backend", optim_backends("cpu"))
def test_non_contiguous_params_and_grads(backend):
    torch.manual_seed(0)
    base = torch.randn(6, 10)
    params = {"transposed": base.t(), "strided": base[:, ::2], "channels_last":
              torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)}
    ours = {k: nn.Parameter(v.clone(memory_format=torch.preserve_format)) for k, v in params.items()}
    ours["strided"] = nn.Parameter(torch.randn(10, 12)[:, ::3])  # a non-dense view param
    theirs = {k: nn.Parameter(v.detach().clone()) for k, v in ours.items()}
    opt = AdamW(ours.values(), lr=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs.values(), lr=0.1, foreach=False)
    scaler = amp_engine.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # places the scale (what scaling the loss does)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = {k: torch.randn(v.shape, generator=g) for k, v in ours.items()}
        for k, p in ours.items():  # grads in yet another layout
            p.grad = (grads[k] * 2.0**10).transpose(0, 1).contiguous().transpose(0, 1)
            theirs[k].grad = grads[k].clone()
        scaler.step(opt)
        scaler.update()
        ref.step()
    for k in ours:
        assert ours[k].stride() == theirs[k].stride() or k == "strided"
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- wrong-shaped scale / found_inf
@pytest.mark.parametrize("name", ["grad_scale", "found_inf", "clip_coef"])
def test_wrong_shaped_hand_off_tensors(name):
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = AdamW([p])
    setattr(opt, name, torch.ones(2))
    with pytest.raises(ValueError, match=rf"optimizer.{name} has shape \(2,\)"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and float(opt.state[p]["step"]) == 0.0


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("name,bad", [("scale", torch.ones(2)), ("growth_tracker", torch.zeros(2, dtype=torch.int32)),
                                      ("found_inf", torch.zeros(1, 2)),
                                      ("scale", torch.ones((), dtype=torch.float64))])
def test_wrong_shaped_or_typed_scale_tensors(backend, name, bad):
    state = dict(scale=torch.full((), 4.0), growth_tracker=torch.zeros((), dtype=torch.int32),
                 hysteresis_tracker=torch.ones((), dtype=torch.int32), found_inf=torch.zeros(()))
    state[name] = bad
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises((ValueError, TypeError), match=name):
        ops.update_scale_(*state.values(), growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=3, backend=backend)
    assert all(torch.equal(before[k], state[k]) for k in state)
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0)
    model = mlp(torch.float32, 0)
    _scaled_backward(model, scaler)
    scaler.step(AdamW(model.parameters()))
    with pytest.raises(AssertionError, match="1-element"):  # torch's message
        scaler.update(torch.ones(2))


# ---------------------------------------------------------------- methods in the wrong order
def test_methods_in_the_wrong_order():
    """Beyond torch's cases (tests/test_scaler_api.py::test_errors_match_torch)."""
    model = mlp(torch.float32, 0)
    opt = AdamW(model.parameters())
    scaler = amp_engine.GradScaler("cpu", init_scale=4.0)
    _scaled_backward(model, scaler)
    saved = scaler.state_dict()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="clip_grad_norm_.*already|already been called"):
        scaler.clip_grad_norm_(opt, 1.0)
    with pytest.raises(RuntimeError, match="middle of an iteration"):
        scaler.load_state_dict(saved)  # the grads were scaled with the current scale
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.clip_grad_norm_(opt, 1.0)
    scaler.update()
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.update()  # twice
    scaler.load_state_dict(saved)  # between iterations: fine
    assert scaler.get_scale() == 4.0


# ---------------------------------------------------------------- more than 2**31 elements
N_BIG = 2**31 + 4099  # odd, past the int32 range


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def _compiled(backends):
    return [b for b in backends if b in ("cpp", "cuda")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", _compiled(available_backends("cpu")))
def test_scaling_ops_beyond_2_31_elements(backend):
    if _available_gb() < 8:
        pytest.skip("needs ~5 GB of free RAM")
    g = torch.full((N_BIG,), 2.0, dtype=torch.float16)
    marks = {0: 3.0, 2**31 - 1: -5.0, 2**31: 7.0, N_BIG - 1: 9.0}
    for i, v in marks.items():
        g[i] = v
    found = torch.zeros(())
    inv = torch.tensor(0.25)
    norm = ops.grad_norm_and_check([g], inv, found, backend=backend)
    expected = math.sqrt((N_BIG - 4) * 0.25 + sum((v / 4) ** 2 for v in marks.values()))
    assert math.isclose(float(norm), expected, rel_tol=1e-5) and found.item() == 0.0
    g[2**31 + 1] = math.inf
    g[N_BIG - 2] = math.nan
    counts = torch.zeros(1, dtype=torch.int64)
    ops.unscale_and_check_([g], inv, found, counts, backend=backend)
    assert found.item() == 1.0 and counts.tolist() == [2]
    for i, v in marks.items():  # elements past 2**31 were unscaled, nothing else touched
        assert g[i].item() == v / 4
    assert g[2**31 + 2].item() == 0.5 and g[N_BIG - 3].item() == 0.5 and g[12345].item() == 0.5
    del g


@pytest.mark.slow
@pytest.mark.parametrize("backend", _compiled(optim_backends("cpu")))
def test_sgd_step_beyond_2_31_elements_with_stochastic_rounding(backend):
    """bf16 param + grad (8.6 GB): stochastic-rounding offsets past 2**31 follow the
    reference's int64 element offsets, so a wrapped index would change the bits."""
    if _available_gb() < 12:
        pytest.skip("needs ~9 GB of free RAM")
    p = torch.full((N_BIG,), 1.0, dtype=torch.bfloat16)
    g = torch.full((N_BIG,), 0.375, dtype=torch.bfloat16)
    rng = torch.tensor([0x1234_5678_9ABC, 5], dtype=torch.int64)
    rng_before = rng.clone()
    steps = [torch.zeros(())]
    ops.sgd_step_([p], [g], [], [], steps, lr=0.01, inv_scale=torch.tensor(0.5),
                  stochastic_rounding=True, rng_state=rng, backend=backend)
    # the reference's arithmetic for one element: w = 1 + fp32(-lr) * (0.375 * 0.5), in fp32
    w = torch.tensor(1.0) + torch.tensor(-0.01) * (torch.tensor(0.375) * torch.tensor(0.5))
    for lo in (0, 2**31 - 64, N_BIG - 128):  # the middle window straddles 2**31
        pos = torch.arange(lo, lo + 128, dtype=torch.int64)
        want = round_bf16_stochastic(w.expand(128).contiguous(), sr_bits(rng_before, 0, pos))
        assert torch.equal(p[lo:lo + 128].view(torch.int16), want.view(torch.int16)), f"at {lo}"
    assert float(steps[0]) == 1.0 and rng[1].item() == 6
    del p, g


def test_bad_inputs_doc_lists_every_row():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "bad_inputs.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    for row in ("integer", "complex", "sparse", "mixed devices", "without grad", "None grad",
                "empty param group", "duplicated", "non-contiguous", "2^31", "found_inf",
                "wrong order", "checkpoint"):
        assert row.lower() in text.lower(), row
