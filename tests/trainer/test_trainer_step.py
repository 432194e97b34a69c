"""MixedPrecisionTrainer.train_step / validate_step: results, syncs, accumulation,
clipping, skipping, the scheduler and the scaler settings."""
import math
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import amp_engine.optim as fused_optim
from amp_engine.scaler import GradScaler

from .helpers import CE, InfAt, blobs, make_trainer, mlp, params_of

X, Y = blobs(64)
BATCH = (X[:16], Y[:16])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_result_keys_and_types(dtype):
    trainer = make_trainer(dtype=dtype)
    out = trainer.train_step(BATCH, CE, "cpu")
    assert set(out) == {"loss", "accuracy", "step_time", "scale", "skipped", "grad_norm", "optimizer_step", "amp"}
    for key in ("loss", "accuracy", "step_time", "scale", "grad_norm"):
        assert type(out[key]) is float, key
    assert out["skipped"] is False and out["optimizer_step"] is True and out["amp"] is True
    assert 0.0 <= out["accuracy"] <= 1.0 and out["step_time"] > 0
    assert out["scale"] == (2.0**16 if dtype == "fp16" else 1.0)
    assert isinstance(trainer.scaler, GradScaler)


def test_accuracy_counts_classes_and_ignores_regression():
    model = mlp()
    trainer = make_trainer(model, dtype="bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = (model(X[:16]).argmax(1) == Y[:16]).float().mean().item()
    assert trainer.train_step(BATCH, CE, "cpu")["accuracy"] == pytest.approx(expected)
    reg = make_trainer(mlp(d_out=1), dtype="bf16")
    assert reg.train_step((X[:16], X[:16, :1]), nn.functional.mse_loss, "cpu")["accuracy"] is None


def test_loss_is_the_amp_loss():
    model = mlp()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = CE(model(X[:16]), Y[:16]).item()
    assert make_trainer(model, dtype="bf16").train_step(BATCH, CE, "cpu")["loss"] == expected


class SyncCounter:
    """Counts the Python-level ways of copying a tensor's value to the host, made by
    the trainer, scaler and optimizer layers of amp_engine. The op layer's plain-torch
    reference backend (the CPU stand-in for a kernel) is not counted: its host
    arithmetic is what a CUDA kernel does on the device."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _name=name, _orig=original, **k):
                caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
                if "/amp_engine/" in caller and "/amp_engine/ops/" not in caller:
                    self.calls.append(_name)
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_one_sync_per_step_with_the_fused_optimizer(monkeypatch, dtype):
    trainer = make_trainer(dtype=dtype, fused_optimizer=True, optim_cls=torch.optim.AdamW, lr=1e-3,
                           max_grad_norm=1.0, gradient_accumulation_steps=2)
    for _ in range(2):
        trainer.train_step(BATCH, CE, "cpu")  # first window: lazy setup
    counter = SyncCounter(monkeypatch)
    results = [trainer.train_step(BATCH, CE, "cpu") for _ in range(4)]
    assert counter.calls == ["tolist"] * 4  # micro-batches and optimizer steps alike
    assert [r["optimizer_step"] for r in results] == [False, True, False, True]


def test_torch_optimizer_costs_the_scalers_skip_decision(monkeypatch):
    trainer = make_trainer(dtype="fp16")  # torch.optim.SGD: the host decides the skip
    trainer.train_step(BATCH, CE, "cpu")
    counter = SyncCounter(monkeypatch)
    trainer.train_step(BATCH, CE, "cpu")
    assert sorted(counter.calls) == ["item", "tolist"]


def _accumulated_vs_big(n, **fields):
    micro = [(X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]) for i in range(n)]
    big = (X[:8 * n], Y[:8 * n])
    a, b = mlp(), mlp()
    ta = make_trainer(a, lr=0.5, gradient_accumulation_steps=n, **fields)
    tb = make_trainer(b, lr=0.5, **fields)
    start = params_of(a)
    flags = [ta.train_step(m, CE, "cpu")["optimizer_step"] for m in micro]
    tb.train_step(big, CE, "cpu")
    assert flags == [False] * (n - 1) + [True]
    return start, params_of(a), params_of(b)


@pytest.mark.parametrize("fields,tol", [
    (dict(enable_amp=False), 1e-6),
    (dict(dtype="fp16"), 2e-3),
    (dict(dtype="fp16", fused_optimizer=True), 2e-3),
    (dict(dtype="bf16"), 2e-2),
])
def test_accumulation_equals_one_big_batch(fields, tol):
    start, acc, big = _accumulated_vs_big(4, **fields)
    for s, a, b in zip(start, acc, big):
        update = (b - s).abs().max()
        assert update > 0
        assert (a - b).abs().max() <= tol * update  # relative to the update itself


def test_accumulation_keeps_the_scale_within_a_window():
    trainer = make_trainer(dtype="fp16", init_scale=2.0**10, growth_interval=1, gradient_accumulation_steps=3)
    scales = [trainer.train_step(BATCH, CE, "cpu")["scale"] for _ in range(6)]
    assert scales == [1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 4096.0]  # grows only at a step


def _norm_reference(model, dtype):
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = CE(ref(X[:16]), Y[:16])
    loss.backward()
    return torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()


@pytest.mark.parametrize("fields,dtype", [
    (dict(enable_amp=False), None),
    (dict(dtype="fp16"), torch.float16),
    (dict(dtype="fp16", fused_optimizer=True), torch.float16),
    (dict(dtype="bf16", fused_optimizer=True), torch.bfloat16),
])
def test_clipping_through_the_scaler(fields, dtype):
    model = mlp()
    expected_norm = _norm_reference(model, dtype)
    trainer = make_trainer(model, lr=1.0, max_grad_norm=0.05, **fields)
    before = params_of(model)
    out = trainer.train_step(BATCH, CE, "cpu")
    assert out["grad_norm"] == pytest.approx(expected_norm, rel=1e-3) and expected_norm > 0.05
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.05, rel=1e-3)  # SGD lr=1: the clipped grad


def test_grad_norm_reported_without_clipping():
    model = mlp()
    expected = _norm_reference(model, torch.float16)
    out = make_trainer(model, dtype="fp16").train_step(BATCH, CE, "cpu")
    assert out["grad_norm"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_overflow_is_skipped_and_backs_off(fused):
    model = mlp()
    trainer = make_trainer(model, dtype="fp16", fused_optimizer=fused)
    before = params_of(model)
    out = trainer.train_step(BATCH, InfAt({0}), "cpu")
    assert out["skipped"] is True and out["scale"] == 2.0**15
    assert not math.isfinite(out["grad_norm"]) and math.isinf(out["loss"])
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_bf16_scaler_checks_and_skips_at_scale_one():
    model = mlp()
    trainer = make_trainer(model, dtype="bf16")
    before = params_of(model)
    out = trainer.train_step(BATCH, InfAt({0}), "cpu")
    assert out["skipped"] is True and out["scale"] == 1.0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert trainer.train_step(BATCH, CE, "cpu")["scale"] == 1.0  # pinned: never grows


def test_without_the_grad_scaler_nothing_is_checked():
    model = mlp()
    trainer = make_trainer(model, dtype="bf16", enable_grad_scaler=False)
    out = trainer.train_step(BATCH, InfAt({0}), "cpu")
    assert trainer.scaler is None
    assert out["skipped"] is False and out["scale"] == 1.0 and out["amp"] is True
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was applied


def test_fp16_without_scaler_runs_unscaled():
    trainer = make_trainer(dtype="fp16", enable_grad_scaler=False)
    seen = []
    model = trainer.model
    model[2].weight.register_hook(lambda g: seen.append(g.abs().max().item()))
    out = trainer.train_step(BATCH, CE, "cpu")
    assert out["scale"] == 1.0 and seen[0] < 10  # a scaled grad would be ~2**16 larger


def test_scaler_settings_reach_the_scaler():
    t = make_trainer(dtype="fp16", init_scale=2.0**10, growth_interval=2, growth_factor=4.0, backoff_factor=0.25)
    scales = [t.train_step(BATCH, CE, "cpu")["scale"] for _ in range(2)]
    assert scales == [1024.0, 4096.0]
    assert t.train_step(BATCH, InfAt({0}), "cpu")["scale"] == 1024.0
    capped = make_trainer(dtype="fp16", init_scale=2.0**10, growth_interval=1, max_scale=2.0**11)
    assert [capped.train_step(BATCH, CE, "cpu")["scale"] for _ in range(3)] == [2048.0] * 3
    floor = make_trainer(dtype="fp16", init_scale=2.0**10, min_scale=2.0**9, floor_patience=100)
    assert [floor.train_step(BATCH, InfAt({0, 1, 2}), "cpu")["scale"] for _ in range(3)] == [512.0] * 3


def test_hysteresis_delays_the_backoff():
    t = make_trainer(dtype="fp16", init_scale=2.0**10, hysteresis=2)
    bad = InfAt({0, 1})
    assert [t.train_step(BATCH, bad, "cpu")["scale"] for _ in range(2)] == [1024.0, 512.0]


def test_scheduler_steps_only_on_applied_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = make_trainer(model, opt, dtype="fp16", scheduler=sched)
    bad = InfAt({1})
    skipped = [trainer.train_step(BATCH, bad, "cpu")["skipped"] for _ in range(4)]
    assert skipped == [False, True, False, False]
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.125


def test_scheduler_follows_the_fused_replacement():
    model = mlp()
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1},
                             {"params": model[2].parameters(), "lr": 0.01}], lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = make_trainer(model, opt, dtype="bf16", fused_optimizer=True, scheduler=sched)
    new = trainer.optimizer
    assert isinstance(new, fused_optim.AdamW) and new is not opt
    for old_g, new_g in zip(opt.param_groups, new.param_groups):
        assert [id(p) for p in old_g["params"]] == [id(p) for p in new_g["params"]]
        for key in ("lr", "betas", "eps", "weight_decay", "initial_lr"):
            assert new_g[key] == old_g[key], key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        trainer.train_step(BATCH, CE, "cpu")
    assert [g["lr"] for g in new.param_groups] == [0.05, 0.005]
    assert new.state and not opt.state  # the fused one did the step


def test_unsupported_optimizer_is_kept_with_a_warning(caplog):
    model = mlp()
    opt = torch.optim.RMSprop(model.parameters())
    with caplog.at_level("WARNING", logger="amp_engine.trainer"):
        trainer = make_trainer(model, opt, fused_optimizer=True)
    assert trainer.optimizer is opt
    assert "RMSprop has no fused counterpart" in caplog.text


def test_autocast_enabled_switch():
    dtypes = []

    def loss_fn(out, y):
        dtypes.append(out.dtype)
        return CE(out.float(), y)
    on = make_trainer(dtype="fp16").train_step(BATCH, loss_fn, "cpu")
    off = make_trainer(dtype="fp16", autocast_enabled=False).train_step(BATCH, loss_fn, "cpu")
    assert dtypes == [torch.float16, torch.float32]
    assert on["scale"] == off["scale"] == 2.0**16 and off["amp"]  # the scaler still runs


def test_validate_step():
    model = mlp()
    trainer = make_trainer(model, dtype="bf16")
    dtypes = []

    def loss_fn(out, y):
        dtypes.append(out.dtype)
        return CE(out, y)
    model.train()
    out = trainer.validate_step(BATCH, loss_fn, "cpu")
    assert set(out) == {"loss", "accuracy", "step_time"} and type(out["loss"]) is float
    assert dtypes == [torch.bfloat16] and model.training
    assert all(p.grad is None for p in model.parameters())
    trainer.disable_amp()
    trainer.validate_step(BATCH, loss_fn, "cpu")
    assert dtypes[-1] == torch.float32


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_tuple_and_dict_inputs():
    t = make_trainer(TwoInputs(), dtype="bf16")
    assert math.isfinite(t.train_step(((X[:16], X[:16]), Y[:16]), CE, "cpu")["loss"])
    assert math.isfinite(t.train_step(({"x": X[:16], "z": X[:16]}, Y[:16]), CE, "cpu")["loss"])


def test_bad_calls():
    t = make_trainer(dtype="bf16")
    with pytest.raises(TypeError, match="batch must be a pair"):
        t.train_step((X, Y, Y), CE, "cpu")
    with pytest.raises(ValueError, match="loss_fn must return a one-element tensor"):
        t.train_step(BATCH, lambda o, y: o, "cpu")
    with pytest.raises(ValueError, match="model's parameters are on cpu"):
        t.train_step(BATCH, CE, "meta")
    with pytest.raises(TypeError, match="optimizer must be"):
        make_trainer(mlp(), opt="sgd")
    with pytest.raises(TypeError, match="unknown MixedPrecisionConfig field"):
        make_trainer(learning_rate=0.1)
