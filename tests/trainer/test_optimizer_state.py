"""MixedPrecisionConfig.optimizer_state: validation, the conversion passing it on,
stats, checkpoints, and the memory it saves counted by hand."""
import json
import logging
import math

import pytest
import torch
from torch import nn

import amp_engine.optim as fused_optim
from amp_engine import MixedPrecisionConfig
from amp_engine.trainer.memory import bytes_per_param, state_bytes

from .helpers import CE, make_trainer, params_of

D_IN, H, D_OUT = 48, 160, 3  # first weight 7,680 elements (8-bit: 30 blocks, the last ragged)


def wide(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, D_OUT))


def data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return x, torch.randint(0, D_OUT, (n,), generator=g)


def adamw_trainer(model=None, **fields):
    model = wide() if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fields.setdefault("dtype", "bf16")
    return make_trainer(model, opt, **fields)


def train(trainer, steps=3):
    x, y = data()
    for i in range(steps):
        trainer.train_step((x[8 * (i % 4):8 * (i % 4) + 8], y[8 * (i % 4):8 * (i % 4) + 8]), CE, "cpu")
    return trainer


# ---------------------------------------------------------------- the field
@pytest.mark.parametrize("given,expected", [(None, None), ("fp32", "fp32"), ("bf16", "bf16"),
                                            ("8bit", "8bit"), (" 8BIT ", "8bit")])
def test_values(given, expected):
    assert MixedPrecisionConfig(optimizer_state=given).optimizer_state == expected


@pytest.mark.parametrize("given,exc", [("int8", ValueError), ("fp16", ValueError), ("", ValueError),
                                       (torch.uint8, TypeError), (8, TypeError)])
def test_bad_values_name_field_value_and_allowed(given, exc):
    with pytest.raises(exc) as info:
        MixedPrecisionConfig(optimizer_state=given)
    text = str(info.value)
    assert "optimizer_state" in text and repr(given) in text
    assert all(v in text for v in ("'fp32'", "'bf16'", "'8bit'", "None"))


@pytest.mark.parametrize("fields,expected", [
    ({}, None), ({"memory_efficient": True}, "8bit"),
    ({"memory_efficient": True, "optimizer_state": "fp32"}, "fp32"), ({"optimizer_state": "bf16"}, "bf16"),
])
def test_memory_efficient_means_8bit_unless_told_otherwise(fields, expected):
    assert MixedPrecisionConfig(**fields).resolved_optimizer_state == expected


def test_json_round_trip():
    cfg = MixedPrecisionConfig(optimizer_state="8bit", memory_efficient=True)
    data_ = json.loads(json.dumps(cfg.to_dict(), allow_nan=False))
    assert data_["optimizer_state"] == "8bit"
    assert MixedPrecisionConfig.from_dict(data_) == cfg
    with pytest.raises(ValueError, match="optimizer_state"):
        MixedPrecisionConfig.from_dict({**data_, "optimizer_state": "4bit"})


# ---------------------------------------------------------------- the conversion
def _moment_dtypes(opt):
    return {(g["exp_avg_dtype"], g["exp_avg_sq_dtype"]) for g in opt.param_groups}


@pytest.mark.parametrize("fields,dtype", [
    ({"optimizer_state": "8bit"}, torch.uint8), ({"optimizer_state": "bf16"}, torch.bfloat16),
    ({"optimizer_state": "fp32"}, torch.float32), ({"memory_efficient": True}, torch.uint8),
    ({"memory_efficient": True, "optimizer_state": "bf16"}, torch.bfloat16),
    ({"fused_optimizer": True}, torch.float32),
])
def test_conversion_passes_it_on(fields, dtype):
    trainer = train(adamw_trainer(**fields))
    opt = trainer.optimizer
    assert type(opt) is fused_optim.AdamW and _moment_dtypes(opt) == {(dtype, dtype)}
    big, small = trainer.model[0].weight, trainer.model[2].weight  # 7,680 and 480 elements
    assert opt.state[big]["exp_avg"].dtype == opt.state[big]["exp_avg_sq"].dtype == dtype
    assert opt.state[small]["exp_avg"].dtype == torch.float32  # under 4,096 elements: fp32 moments
    assert trainer.get_amp_stats()["optimizer_state"] == {torch.uint8: "8bit", torch.bfloat16: "bf16",
                                                          torch.float32: "fp32"}[dtype]


def test_optimizer_state_alone_implies_the_fused_optimizer():
    assert type(adamw_trainer(optimizer_state="fp32").optimizer) is fused_optim.AdamW
    assert type(adamw_trainer().optimizer) is torch.optim.AdamW  # nothing asked: torch's stays


def test_an_amp_engine_optimizer_is_rebuilt_with_the_state():
    model = wide()
    trainer = make_trainer(model, fused_optim.AdamW(model.parameters()), dtype="bf16", optimizer_state="8bit")
    assert _moment_dtypes(trainer.optimizer) == {(torch.uint8, torch.uint8)}


def test_carried_state_is_converted():
    """A torch AdamW that already stepped: its fp32 moments become bf16, rounded to nearest even."""
    model = wide()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = data()
    CE(model(x), y).backward()
    opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    trainer = make_trainer(model, opt, dtype="bf16", optimizer_state="bf16")
    w = model[0].weight
    for key in ("exp_avg", "exp_avg_sq"):
        got = trainer.optimizer.state[w][key]
        assert got.dtype == torch.bfloat16 and torch.equal(got, before[w][key].to(torch.bfloat16))


def test_sgd_has_no_moments(caplog):
    model = wide()
    with caplog.at_level(logging.WARNING, "amp_engine.trainer"):
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), dtype="bf16",
                               optimizer_state="8bit")
    assert type(trainer.optimizer) is fused_optim.SGD
    assert "optimizer_state='8bit' ignored: SGD keeps no Adam moments" in caplog.text
    assert trainer.get_amp_stats()["optimizer_state"] is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, "amp_engine.trainer"):  # implied by memory_efficient: silent
        make_trainer(wide(), None, lr=0.1, dtype="bf16", memory_efficient=True)
    assert "ignored" not in caplog.text


def test_amsgrad_keeps_fp32_moments_unless_8bit_is_asked(caplog):
    def trainer(**fields):
        model = wide()
        return make_trainer(model, torch.optim.AdamW(model.parameters(), amsgrad=True), dtype="bf16", **fields)

    implied = trainer(memory_efficient=True).optimizer
    assert type(implied) is fused_optim.AdamW and _moment_dtypes(implied) == {(torch.float32, torch.float32)}
    with caplog.at_level(logging.WARNING, "amp_engine.trainer"):
        refused = trainer(optimizer_state="8bit").optimizer
    assert type(refused) is torch.optim.AdamW
    assert "amsgrad=True needs fp32 moments" in caplog.text


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fields", [{"memory_efficient": True}, {"optimizer_state": "8bit", "dtype": "fp16"}])
def test_checkpoint_names_it_and_resumes_bitwise(fields):
    a = train(adamw_trainer(**fields), 3)
    sd = a.state_dict()
    assert sd["optimizer_state"] == "8bit"
    assert sd["optimizer"]["state"][0]["exp_avg"].dtype == torch.uint8  # kept quantized
    model_sd = {k: v.clone() for k, v in a.model.state_dict().items()}
    b = adamw_trainer(wide(seed=5), **fields)
    b.model.load_state_dict(model_sd)
    b.load_state_dict(sd)
    train(a, 2)  # a continues; b resumes with the same batches (and stochastic-rounding stream)
    train(b, 2)
    for p, q in zip(params_of(a.model), params_of(b.model)):
        assert torch.equal(p, q)
    wa, wb = a.model[0].weight, b.model[0].weight
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(a.optimizer.state[wa][key], b.optimizer.state[wb][key])


def test_checkpoint_of_another_precision_loads_converted(caplog):
    sd = train(adamw_trainer(fused_optimizer=True), 2).state_dict()
    assert sd["optimizer_state"] == "fp32"
    b = adamw_trainer(optimizer_state="bf16")
    with caplog.at_level(logging.INFO, "amp_engine.trainer"):
        b.load_state_dict(sd)
    assert "optimizer_state='fp32', this trainer keeps 'bf16'" in caplog.text
    w = b.model[0].weight
    assert torch.equal(b.optimizer.state[w]["exp_avg"], sd["optimizer"]["state"][0]["exp_avg"].to(torch.bfloat16))


def test_checkpoint_field_checked_and_optional():
    a = train(adamw_trainer(optimizer_state="8bit"), 1)
    sd = a.state_dict()
    with pytest.raises(ValueError, match="optimizer_state.*must be a str or None"):
        adamw_trainer(optimizer_state="8bit").load_state_dict({**sd, "optimizer_state": 8})
    old = {k: v for k, v in sd.items() if k != "optimizer_state"}  # written before the field existed
    adamw_trainer(optimizer_state="8bit").load_state_dict(old)


# ---------------------------------------------------------------- memory, by hand
def test_state_bytes_of_8bit_moments_by_hand():
    model = wide()
    opt = fused_optim.AdamW8bit(model.parameters())
    x, y = data()
    CE(model(x), y).backward()
    opt.step()
    sizes = [p.numel() for p in model.parameters()]  # 7680, 160, 480, 3
    quantized = [n for n in sizes if n >= 4096]
    assert quantized == [D_IN * H]
    blocks = sum(math.ceil(n / 256) for n in quantized)  # 30: 7,680 = 30 x 256
    codes = 2 * sum(quantized)  # exp_avg and exp_avg_sq: one byte per element each
    full = 8 * sum(n for n in sizes if n < 4096)
    steps = 4 * len(sizes)
    s = state_bytes(model, opt)
    assert s["optimizer_state"]["actual"] == codes + 2 * 4 * blocks + full + steps
    # fp32 training: 8 bytes of moments per element, no absmax
    assert s["optimizer_state"]["fp32"] == 8 * sum(sizes) + steps
    n = sum(sizes)
    per = bytes_per_param(s, n)
    assert per["params"] == per["grads"] == 4.0
    assert per["total"] == pytest.approx(8 + (codes + 8 * blocks + full + steps) / n)
    assert bytes_per_param(s, n, "fp32")["total"] == pytest.approx(16 + steps / n)


def test_ragged_last_block_counted():
    lin = nn.Linear(100, 65, bias=False)  # 6,500 elements: 25 full blocks and one of 100
    opt = fused_optim.AdamW8bit(lin.parameters())
    lin(torch.randn(2, 100)).sum().backward()
    opt.step()
    s = state_bytes(lin, opt)
    assert s["optimizer_state"]["actual"] == 2 * 6500 + 2 * 4 * 26 + 4


def test_bytes_per_param_checks_its_count():
    with pytest.raises(ValueError, match="n_params=0"):
        bytes_per_param({"params": {"actual": 1, "fp32": 1}}, 0)


def test_memory_efficient_bf16_is_about_6_bytes_per_param():
    """bf16 weights + grads (2 + 2) and 8-bit moments (~2.03) on the tensors that quantize."""
    trainer = train(adamw_trainer(memory_efficient=True), 2)
    model = trainer.model
    x, y = data()
    CE(model(x.to(torch.bfloat16)).float(), y).backward()
    n = sum(p.numel() for p in model.parameters())
    per = bytes_per_param(state_bytes(model, trainer.optimizer), n)
    assert per["params"] == per["grads"] == 2.0
    w = model[0].weight.numel()  # the only quantized tensor; the rest keep 8 bytes of fp32 moments
    expected = (2 * w + 8 * math.ceil(w / 256) + 8 * (n - w) + 4 * 4) / n
    assert per["optimizer_state"] == pytest.approx(expected)
