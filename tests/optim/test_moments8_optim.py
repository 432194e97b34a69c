"""AdamW / Adam with compact moments: options, checkpoints, torch export, accuracy, memory."""
from __future__ import annotations

import io

import pytest
import torch

from amp_engine.ops import moments8
from amp_engine.optim import Adam, AdamW, AdamW8bit
from amp_engine.optim._moments import as_fp32

U8, BF = torch.uint8, torch.bfloat16


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                               torch.nn.Linear(96, 48)).to(dtype)  # 6144 / 4608 weights: 8-bit


def _train(model, opt, steps, seed=1, found_inf_at=()):
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x = torch.randn(16, 64, generator=gen).to(next(model.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        if k in found_inf_at:
            opt.found_inf = torch.tensor(1.0)
        opt.step()
        opt.__dict__.pop("found_inf", None)
        opt.zero_grad()


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        st = opt.state[p]
        out += [st[k].clone() for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def _bitwise_equal(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b))


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_dtype_arguments_are_validated(cls):
    params = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(TypeError, match="exp_avg_dtype"):
        cls(params, exp_avg_dtype="uint8")
    with pytest.raises(ValueError, match="exp_avg_sq_dtype=torch.float16"):
        cls(params, exp_avg_sq_dtype=torch.float16)
    with pytest.raises(ValueError, match="amsgrad"):
        cls(params, amsgrad=True, exp_avg_dtype=U8)
    with pytest.raises(TypeError):
        cls(params, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, U8)  # keyword-only


def test_state_formats_and_small_tensors():
    model = _model()
    opt = AdamW(model.parameters(), exp_avg_dtype=BF, exp_avg_sq_dtype=U8)
    _train(model, opt, 2)
    w, b = model[0].weight, model[0].bias
    assert opt.state[w]["exp_avg"].dtype == BF and opt.state[w]["exp_avg_sq"].dtype == U8
    assert opt.state[w]["exp_avg_sq_absmax"].shape == (moments8.n_blocks(w.numel()),)
    assert "exp_avg_absmax" not in opt.state[w]
    assert opt.state[b]["exp_avg"].dtype == torch.float32  # 96 < 4096 elements


def test_skipped_step_leaves_state_bitwise():
    model = _model(BF)
    opt = AdamW8bit(model.parameters(), stochastic_rounding=True)
    _train(model, opt, 3)
    before = _snapshot(model, opt)
    _train(model, opt, 1, found_inf_at=(0,))
    assert _bitwise_equal(before, _snapshot(model, opt))


@pytest.mark.parametrize("dtype,kwargs", [
    (torch.float32, {}), (BF, {"stochastic_rounding": True}), (BF, {"master_weights": True})])
def test_resume_is_bitwise_exact(dtype, kwargs):
    model = _model(dtype)
    opt = AdamW8bit(model.parameters(), **kwargs)
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    resumed = _model(dtype, seed=5)
    resumed.load_state_dict(ck["model"])
    opt2 = AdamW8bit(resumed.parameters(), **kwargs)
    opt2.load_state_dict(ck["opt"])
    w = resumed[0].weight
    assert opt2.state[w]["exp_avg"].dtype == U8  # torch's loader did not cast the codes
    assert opt2.state[w]["exp_avg_absmax"].dtype == torch.float32
    _train(resumed, opt2, 3, seed=2)
    _train(model, opt, 3, seed=2)  # the run that never stopped
    assert _bitwise_equal(_snapshot(model, opt), _snapshot(resumed, opt2))
    rng = opt.param_groups[0].get("rng_state")
    assert rng is None or torch.equal(rng, opt2.param_groups[0]["rng_state"])


def test_state_dict_keeps_codes_not_expanded():
    model = _model()
    opt = AdamW8bit(model.parameters())
    _train(model, opt, 1)
    st = opt.state_dict()["state"][0]
    assert st["exp_avg"].dtype == U8 and st["exp_avg_sq"].dtype == U8
    assert st["exp_avg_absmax"].numel() == moments8.n_blocks(model[0].weight.numel())


def test_switching_precision_both_ways():
    model = _model()
    fp32 = AdamW(model.parameters())
    _train(model, fp32, 3)
    eight = AdamW8bit(model.parameters())
    eight.load_state_dict(fp32.state_dict())
    w = model[0].weight
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = moments8.quantize(fp32.state[w][key], signed)
        assert torch.equal(eight.state[w][key], codes)
        assert torch.equal(eight.state[w][f"{key}_absmax"], absmax)
    back = AdamW(model.parameters())
    back.load_state_dict(eight.state_dict())
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        want = moments8.dequantize(eight.state[w][key], eight.state[w][f"{key}_absmax"], signed)
        assert back.state[w][key].dtype == torch.float32 and torch.equal(back.state[w][key], want)
        assert f"{key}_absmax" not in back.state[w]
    _train(model, back, 1)  # and it keeps training


def test_fp32_state_dict_loads_into_torch_adamw():
    model = _model()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    sd = opt.fp32_state_dict()
    torch_model, ours_model = _model(), _model()
    for m in (torch_model, ours_model):
        m.load_state_dict(model.state_dict())
    t = torch.optim.AdamW(torch_model.parameters(), lr=1e-2)
    t.load_state_dict(sd)
    w = model[0].weight
    tw = torch_model[0].weight
    assert torch.equal(t.state[tw]["exp_avg"], as_fp32(opt.state[w], "exp_avg", "exp_avg_absmax", True))
    ours = AdamW(ours_model.parameters(), lr=1e-2)  # fp32 moments: the same arithmetic as torch
    ours.load_state_dict(sd)
    _train(torch_model, t, 1, seed=3)
    _train(ours_model, ours, 1, seed=3)
    for a, b in zip(torch_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _char_task(n=12_000, vocab=32, ctx=4):
    """Text from a random Markov chain: a loss floor well above 0 (no memorising)."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 2.5, dim=1)
    ids = [0]
    for u in torch.rand(n, generator=gen).tolist():
        ids.append(min(int(torch.searchsorted(probs[ids[-1]].cumsum(0), torch.tensor(u))), vocab - 1))
    ids = torch.tensor(ids)
    x = torch.stack([ids[i:i + ctx] for i in range(len(ids) - ctx)])
    return x, ids[ctx:]


def _char_loss(exp_avg_dtype, exp_avg_sq_dtype, steps=300):
    x, y = _char_task()
    split = len(x) * 5 // 6
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 32), torch.nn.Flatten(),
                                torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    opt = AdamW(model.parameters(), lr=3e-3, exp_avg_dtype=exp_avg_dtype,
                exp_avg_sq_dtype=exp_avg_sq_dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, split, (64,), generator=gen)
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # held-out loss
        return torch.nn.functional.cross_entropy(model(x[split:]), y[split:]).item()


def test_char_model_8bit_and_bf16_moments_end_within_1_percent():
    fp32 = _char_loss(torch.float32, torch.float32)
    q8 = _char_loss(U8, U8)
    bf16 = _char_loss(BF, BF)
    print(f"char model, 300 steps: fp32 moments {fp32:.4f}, 8-bit {q8:.4f}, bf16 {bf16:.4f}")
    assert abs(q8 - fp32) <= 0.01 * fp32
    assert abs(bf16 - fp32) <= 0.01 * fp32


def _bytes_per_param(model, opt):
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params)
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # per-element state, not counters
                total += v.numel() * v.element_size()
    return total / n


def _wide(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).to(dtype)


def _one_step(model, opt):
    model(torch.randn(4, 512).to(next(model.parameters()).dtype)).float().sum().backward()
    opt.step()


def test_bytes_per_param_of_params_grads_and_state():
    cases = {}
    m = _wide(BF)
    o = AdamW8bit(m.parameters(), stochastic_rounding=True)
    _one_step(m, o)
    cases["bf16 + SR + 8-bit"] = _bytes_per_param(m, o)
    m = _wide(BF)
    o = AdamW8bit(m.parameters())
    _one_step(m, o)
    cases["bf16 + fp32 master + 8-bit"] = _bytes_per_param(m, o)
    m = _wide(torch.float32)
    o = torch.optim.AdamW(m.parameters(), fused=True)
    _one_step(m, o)
    cases["fp32, torch AdamW fused"] = _bytes_per_param(m, o)
    print(", ".join(f"{k}: {v:.2f} B/param" for k, v in cases.items()))
    assert 6.0 <= cases["bf16 + SR + 8-bit"] < 6.1
    assert 10.0 <= cases["bf16 + fp32 master + 8-bit"] < 10.1
    assert cases["fp32, torch AdamW fused"] == pytest.approx(16.0)
