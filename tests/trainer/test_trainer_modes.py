"""AMP switches, fallbacks to fp32, and the housekeeping fields (monitoring,
logging, validation, cache clearing, memory_efficient)."""
import logging
import math

import pytest
import torch
from torch import nn

import amp_engine.trainer.trainer as trainer_module

from .helpers import CE, InfAt, blobs, make_trainer, mlp, params_of

X, Y = blobs(64)
BATCH = (X[:16], Y[:16])


def _amp_flags(trainer, n, loss_fn=CE):
    return [trainer.train_step(BATCH, loss_fn, "cpu")["amp"] for _ in range(n)]


def test_runtime_toggles():
    t = make_trainer(dtype="bf16")
    assert t.amp_enabled and _amp_flags(t, 1) == [True]
    assert t.disable_amp() is False and _amp_flags(t, 1) == [False]
    assert t.train_step(BATCH, CE, "cpu")["scale"] == 1.0
    assert t.enable_amp() is True and _amp_flags(t, 1) == [True]
    assert t.toggle_amp() is False and _amp_flags(t, 1) == [False]
    assert t.toggle_amp() is True and _amp_flags(t, 1) == [True]


@pytest.mark.parametrize("switch", ["enable_amp", "enabled"])
def test_starting_with_amp_off(switch):
    t = make_trainer(dtype="fp16", **{switch: False})
    out = t.train_step(BATCH, CE, "cpu")
    assert out["amp"] is False and out["scale"] == 1.0 and t.scaler is None
    t.enable_amp()
    out = t.train_step(BATCH, CE, "cpu")
    assert out["amp"] is True and out["scale"] == 2.0**16  # the scaler is made on first use


def test_toggle_takes_effect_at_the_next_window():
    t = make_trainer(dtype="bf16", gradient_accumulation_steps=2)
    flags = [t.train_step(BATCH, CE, "cpu")["amp"]]
    t.disable_amp()
    flags += _amp_flags(t, 2)
    assert flags == [True, True, False]


def test_unsupported_dtype_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "autocast_support", lambda d, t: (False, "no fp16 here"))
    t = make_trainer(dtype="fp16")
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        outs = [t.train_step(BATCH, CE, "cpu") for _ in range(3)]
    assert [o["amp"] for o in outs] == [False] * 3 and all(math.isfinite(o["loss"]) for o in outs)
    assert t.fallback_reason == "no fp16 here" and "no fp16 here" in caplog.text
    assert outs[2]["loss"] < outs[0]["loss"]  # it trains on
    assert t.get_amp_stats()["fallbacks"] == ["no fp16 here"]
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        assert t.enable_amp() is False
    assert "force=True" in caplog.text
    monkeypatch.setattr(trainer_module, "autocast_support", lambda d, t: (True, None))
    assert t.enable_amp(force=True) is True and _amp_flags(t, 1) == [True]


class Overflow(nn.Module):
    """Finite in fp32; overflows fp16 (65504) under autocast."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        with torch.no_grad():
            self.lin.weight.fill_(300.0)

    def forward(self, x):
        return self.lin(x * 300.0) / 1e4


def test_compatibility_failure_falls_back_at_construction():
    t = make_trainer(Overflow(), dtype="fp16", check_compatibility=True)
    assert t.compatibility is not None and not t.compatibility["compatible"]
    assert t.fallback_reason.startswith("compatibility check failed")
    assert t.train_step(BATCH, CE, "cpu")["amp"] is False
    assert t.get_amp_stats()["compatible"] is False


def test_check_compatibility_off_runs_no_check():
    t = make_trainer(Overflow(), dtype="fp16", check_compatibility=False)
    assert t.compatibility is None and t.fallback_reason is None
    out = t.train_step(BATCH, CE, "cpu")
    assert out["amp"] and out["skipped"]  # AMP runs; the scaler catches the overflow


def test_scale_stuck_at_its_floor_falls_back():
    model = Overflow()
    t = make_trainer(model, dtype="fp16", init_scale=2.0**10, min_scale=2.0**8, floor_patience=3)
    outs = [t.train_step(BATCH, CE, "cpu") for _ in range(6)]
    assert [o["scale"] for o in outs[:4]] == [512.0, 256.0, 256.0, 256.0]
    assert [o["skipped"] for o in outs[:4]] == [True] * 4
    assert [o["amp"] for o in outs] == [True] * 4 + [False] * 2  # 3 overflows at the floor
    assert "floor" in t.fallback_reason
    assert all(math.isfinite(o["loss"]) and not o["skipped"] for o in outs[4:])


def test_bf16_never_falls_back_for_non_finite_grads(caplog):
    t = make_trainer(dtype="bf16", floor_patience=2)
    bad = InfAt(range(10))
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        outs = [t.train_step(BATCH, bad, "cpu") for _ in range(4)]
    assert all(o["amp"] and o["skipped"] for o in outs) and t.fallback_reason is None
    assert caplog.text.count("2 consecutive steps skipped") == 1


class HalfHater(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        y = self.lin(x)
        if y.dtype != torch.float32:
            raise RuntimeError(f"my_op not implemented for {y.dtype}")
        return y


@pytest.mark.parametrize("n", [1, 2])
def test_forward_failing_under_autocast_falls_back_mid_step(n):
    model = HalfHater()
    t = make_trainer(model, dtype="bf16", gradient_accumulation_steps=n)
    out = t.train_step(BATCH, CE, "cpu")
    assert out["amp"] is False and math.isfinite(out["loss"])
    assert "my_op not implemented for torch.bfloat16" in t.fallback_reason
    if n == 2:
        assert not out["optimizer_step"]
        out = t.train_step(BATCH, CE, "cpu")
    assert out["optimizer_step"] and not out["skipped"]


def test_forward_failing_in_fp32_too_raises_the_original_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            raise RuntimeError("broken model")

    t = make_trainer(Broken(), dtype="bf16")
    with pytest.raises(RuntimeError, match="broken model"):
        t.train_step(BATCH, CE, "cpu")
    assert t.fallback_reason is None


def test_monitoring_off_records_nothing():
    t = make_trainer(dtype="fp16", enable_monitoring=False)
    bad = InfAt({1})
    for i in range(3):
        t.train_step(BATCH, bad, "cpu")
    s = t.get_amp_stats()
    assert s["total_steps"] == s["amp_steps"] == s["scaler_updates"] == s["overflow_count"] == 0
    assert s["top_overflow_params"] == [] and s["monitoring"] is False
    assert not t.scaler._stats.track_overflow  # no per-parameter counting on the device
    assert s["current_scale"] == 2.0**15  # the scaler itself still works


def test_overflowing_parameters_are_named():
    model = mlp()

    def loss_fn(out, y):  # only the head's bias gets a non-finite grad
        return CE(out, y) + model[2].bias.sum() * float("inf")
    t = make_trainer(model, dtype="fp16", overflow_top_k=2)
    for _ in range(2):
        t.train_step(BATCH, loss_fn, "cpu")
    top = t.get_amp_stats()["top_overflow_params"]
    assert [d["name"] for d in top] == ["2.bias"] and top[0]["count"] == 2 * 3
    t0 = make_trainer(mlp(), dtype="fp16", overflow_top_k=0)
    t0.train_step(BATCH, InfAt({0}), "cpu")
    assert t0.get_amp_stats()["top_overflow_params"] == []


def test_log_amp_stats_and_interval(caplog):
    t = make_trainer(dtype="bf16", log_interval=2)
    with caplog.at_level(logging.INFO, logger="amp_engine.trainer"):
        for _ in range(4):
            t.train_step(BATCH, CE, "cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2: scale 1.0")
    caplog.clear()
    quiet = make_trainer(dtype="bf16", log_interval=1, log_amp_stats=False)
    with caplog.at_level(logging.INFO, logger="amp_engine.trainer"):
        quiet.train_step(BATCH, CE, "cpu")
        quiet.cleanup()
    assert caplog.records == []


def test_a_given_logger_is_used(caplog):
    logger = logging.getLogger("my.training.run")
    t = make_trainer(dtype="bf16", log_interval=1, logger=logger)
    with caplog.at_level(logging.INFO, logger="my.training.run"):
        t.train_step(BATCH, CE, "cpu")
    assert {r.name for r in caplog.records} == {"my.training.run"}


def test_validate_amp(caplog):
    t = make_trainer(dtype="bf16", validate_amp=True)
    t.train_step(BATCH, CE, "cpu")
    v = t.get_amp_stats()["validation"]
    assert v["passed"] and 0 < v["max_rel_error"] < 0.05 and v["tolerance"] == 0.05
    strict = make_trainer(dtype="bf16", validate_amp=True, validate_tolerance=1e-9)
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        strict.train_step(BATCH, CE, "cpu")
    assert not strict.validation["passed"] and "validate_amp" in caplog.text
    off = make_trainer(dtype="bf16", validate_amp=False)
    off.train_step(BATCH, CE, "cpu")
    assert off.validation is None


def test_validate_amp_flags_non_finite_amp_output(caplog):
    t = make_trainer(Overflow(), dtype="fp16", validate_amp=True)
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        t.train_step(BATCH, CE, "cpu")
    assert t.validation["amp_finite"] is False and "non-finite" in caplog.text


def test_validation_has_no_side_effects():
    a, b = mlp(), mlp()
    make_trainer(a, dtype="bf16", validate_amp=True).train_step(BATCH, CE, "cpu")
    make_trainer(b, dtype="bf16", validate_amp=False).train_step(BATCH, CE, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_clear_cache_every_interval(monkeypatch):
    calls = []
    t = make_trainer(dtype="bf16", clear_cache_interval=2)
    monkeypatch.setattr(t, "_clear_cache", lambda device: calls.append(device.type))
    for _ in range(5):
        t.train_step(BATCH, CE, "cpu")
    assert calls == ["cpu", "cpu"]
    off = make_trainer(dtype="bf16", clear_cache_interval=1, clear_cache=False)
    monkeypatch.setattr(off, "_clear_cache", lambda device: calls.append("off"))
    off.train_step(BATCH, CE, "cpu")
    assert "off" not in calls


def test_clear_cache_empties_only_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    t = make_trainer(dtype="bf16")
    t._clear_cache(torch.device("cpu"))
    assert emptied == [] and t.stats.cache_clears == 0  # no caching allocator on the CPU
    t._clear_cache(torch.device("cuda"))
    assert emptied == [1] and t.stats.cache_clears == 1


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_memory_efficient_weights(dtype):
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    t = make_trainer(model, dtype=dtype, memory_efficient=True, optim_cls=torch.optim.AdamW, lr=1e-2)
    low = torch.bfloat16 if dtype == "bf16" else torch.float16
    losses = [t.train_step((X, Y), CE, "cpu")["loss"] for _ in range(15)]
    assert model[0].weight.dtype == low and model[3].bias.dtype == low
    assert model[1].weight.dtype == torch.float32  # norm layers stay fp32
    group = t.optimizer.param_groups[0]
    assert group["stochastic_rounding"] is (dtype == "bf16") and group["master_weights"] is (dtype == "fp16")
    assert ("master" in t.optimizer.state[model[0].weight]) is (dtype == "fp16")
    assert losses[-1] < 0.8 * losses[0]
    # AMP off: fp32 weights again (from the masters where they exist), still training
    master = t.optimizer.state[model[0].weight].get("master")
    master = None if master is None else master.clone()
    t.disable_amp()
    out = t.train_step((X, Y), CE, "cpu")
    assert model[0].weight.dtype == torch.float32 and math.isfinite(out["loss"])
    assert "master" not in t.optimizer.state[model[0].weight]
    if master is not None:
        assert not torch.equal(model[0].weight, master)  # one fp32 step later
    t.enable_amp()
    t.train_step((X, Y), CE, "cpu")
    assert model[0].weight.dtype == low


def test_memory_efficient_needs_a_fusable_optimizer(caplog):
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="amp_engine.trainer"):
        t = make_trainer(model, torch.optim.RMSprop(model.parameters()), dtype="bf16", memory_efficient=True)
    t.train_step(BATCH, CE, "cpu")
    assert model[0].weight.dtype == torch.float32 and "memory_efficient ignored" in caplog.text


def test_cleanup_drops_grads_and_logs_a_summary(caplog):
    model = mlp()
    t = make_trainer(model, dtype="bf16", gradient_accumulation_steps=2)
    t.train_step(BATCH, CE, "cpu")
    assert model[0].weight.grad is not None
    with caplog.at_level(logging.INFO, logger="amp_engine.trainer"):
        t.cleanup()
    assert all(p.grad is None for p in model.parameters()) and "AMP summary" in caplog.text
    before = params_of(model)
    assert t.flush_accumulation() is None  # the window was dropped
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
