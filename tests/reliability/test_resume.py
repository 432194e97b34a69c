"""Exact resume: a real training process checkpoints mid-run and is killed with SIGKILL;
a new process resumes from the checkpoint and ends bitwise where an uninterrupted run
ends (8-bit moments too). torch.amp.GradScaler + torch.optim.AdamW checkpoints load and continue.
Corrupted or mismatched checkpoints raise a clear error and change nothing."""
from __future__ import annotations

import copy
import io
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import amp_engine
from amp_engine.optim import SGD, AdamW

from .faults import bits, mlp, mse, snapshot

WORKER = Path(__file__).with_name("resume_worker.py")
ROOT = WORKER.parents[2]


def _spawn(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"worker said nothing (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}): {err[-3000:]}"
    assert out.strip().endswith("DONE")


def assert_bitwise_equal(a, b, path="ckpt"):
    """Nested dicts/lists of tensors and numbers, equal bit for bit (timings excepted)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            if k != "step_time_total":  # wall-clock seconds, not state
                assert_bitwise_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("mode", ["bare", "bare8", "trainer"])
def test_sigkill_and_resume_is_bitwise_exact(mode, tmp_path):
    steps, save_at = 26, 12
    ckpt, full_out, resumed_out = tmp_path / "ckpt.pt", tmp_path / "full.pt", tmp_path / "resumed.pt"
    full = _spawn(mode, "--steps", steps, "--out", full_out)
    victim = _spawn(mode, "--steps", steps, "--save-at", save_at, "--ckpt", ckpt, "--hang")
    assert _wait_line(victim) == "SAVED"
    os.kill(victim.pid, signal.SIGKILL)  # mid-run: no cleanup, no atexit, nothing flushed
    assert victim.wait(timeout=60) == -signal.SIGKILL
    victim.stdout.close()
    victim.stderr.close()
    resumed = _spawn(mode, "--steps", steps, "--resume", ckpt, "--out", resumed_out)
    _finish(full)
    _finish(resumed)
    a = torch.load(full_out, weights_only=True)
    b = torch.load(resumed_out, weights_only=True)
    scales_a, scales_b = a.pop("scales"), b.pop("scales")
    assert sorted(scales_b) == list(range(save_at + 1, steps))
    assert {s: scales_a[s] for s in scales_b} == scales_b  # the same scale, step by step
    assert len(set(scales_a.values())) > 2  # the scale moved: backed off and grew
    assert_bitwise_equal(a, b)
    if mode == "bare8":  # the checkpoints held 8-bit codes and their absmax
        weights = [st for st in a["optimizer"]["state"].values() if st["exp_avg"].dim() == 2]
        assert len(weights) == 2 and all(
            st["exp_avg"].dtype == torch.uint8 and "exp_avg_sq_absmax" in st for st in weights)


def _torch_run(model, opt, scaler, steps, first, bad=frozenset({3, 4, 9, 13})):
    scales = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad()
        loss = mse(model(x), y) * (math.inf if step in bad else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_torch_grad_scaler_and_adamw_checkpoints_load(tmp_path):
    model = mlp(torch.float32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    _torch_run(model, opt, scaler, 8, first=0)
    path = tmp_path / "torch.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict()}, path)
    torch_scales = _torch_run(model, opt, scaler, 10, first=8)

    ours_model = mlp(torch.float32, seed=5)
    ours_opt = AdamW(ours_model.parameters(), lr=0.5)  # the checkpoint's lr wins
    ours_scaler = amp_engine.GradScaler("cpu")
    ckpt = torch.load(path, weights_only=True)
    ours_model.load_state_dict(ckpt["model"])
    ours_opt.load_state_dict(ckpt["optimizer"])
    ours_scaler.load_state_dict(ckpt["scaler"])
    assert ours_opt.param_groups[0]["lr"] == 1e-2
    ours_scales = _torch_run(ours_model, ours_opt, ours_scaler, 10, first=8)
    assert ours_scales == torch_scales  # same skips, back-offs and growth
    for p, q in zip(model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)  # fp32 AdamW: a few ulps
    assert all(float(s["step"]) == float(opt.state[p]["step"])
               for p, s in zip(model.parameters(), ours_opt.state.values()))


# ------------------------------------------------------------- corrupted checkpoints
def _trained(dtype=torch.float16):
    model = mlp(torch.float32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = amp_engine.create_mixed_precision_trainer(
        model, opt, dtype=dtype, memory_efficient=True, growth_interval=2, log_amp_stats=False,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        trainer.train_step((torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)),
                           mse, "cpu")
    return model, trainer


def _everything(model, trainer):
    return (snapshot(model, trainer.optimizer), trainer.state_dict())


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(path, value):
    def apply(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return apply


OTHER_MODEL = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
CORRUPTIONS = {
    "missing optimizer": (_drop("optimizer"), "missing"),
    "missing scaler key": (lambda sd: sd["scaler"]["state"].pop("_growth_tracker"), "missing"),
    "scale wrong type": (_set(("scaler", "state", "scale"), torch.ones(3)), "scale"),
    "growth tracker negative": (_set(("scaler", "state", "_growth_tracker"), -1), "_growth_tracker"),
    "moment wrong shape": (_set(("optimizer", "state", 0, "exp_avg"), torch.zeros(5)), "shape"),
    "master wrong dtype": (_set(("optimizer", "state", 0, "master"), torch.zeros(16, 8, dtype=torch.int32)),
                           "floating"),
    "moment missing": (lambda sd: sd["optimizer"]["state"][1].pop("exp_avg_sq"), "exp_avg_sq"),
    "lr not a number": (_set(("optimizer", "param_groups", 0, "lr"), "fast"), "lr"),
    "other model": (lambda sd: sd.__setitem__("optimizer", AdamW(OTHER_MODEL.parameters()).state_dict()
                                              | {"state": {0: {"step": torch.tensor(1.0),
                                                               "exp_avg": torch.zeros(12, 8),
                                                               "exp_avg_sq": torch.zeros(12, 8)}}}),
                    "shape"),
    "another dtype": (_set(("dtype",), "bfloat16"), "dtype"),
    "another optimizer": (_set(("optimizer_class",), "SGD"), "SGD"),
    "stats garbage": (_set(("stats",), {"total_steps": 1}), "stats"),
    "counter negative": (_set(("optimizer_steps",), -2), "optimizer_steps"),
    "not a dict": (None, "dict"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_trainer_checkpoint_changes_nothing(name):
    corrupt, match = CORRUPTIONS[name]
    model, trainer = _trained()
    sd = copy.deepcopy(trainer.state_dict())
    if corrupt is None:
        sd = [sd]
    else:
        corrupt(sd)
    before = _everything(model, trainer)
    with pytest.raises(ValueError, match=match):
        trainer.load_state_dict(sd)
    assert_bitwise_equal(before, _everything(model, trainer))


def test_trainer_checkpoint_into_a_fresh_trainer_and_mid_window_refused():
    model, trainer = _trained()
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "trainer": trainer.state_dict()}, blob)
    ckpt = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    model2 = mlp(torch.float32, seed=3)
    trainer2 = amp_engine.create_mixed_precision_trainer(
        model2, torch.optim.AdamW(model2.parameters(), lr=0.3), memory_efficient=True,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    trainer2.load_state_dict(ckpt["trainer"])  # before the model: either order works
    model2.load_state_dict(ckpt["model"])
    assert_bitwise_equal(_everything(model, trainer), _everything(model2, trainer2))
    # inside an accumulation window the grads would be lost: refused, nothing changed
    model3 = mlp(torch.float32, 0)
    acc = amp_engine.create_mixed_precision_trainer(
        model3, SGD(model3.parameters()), gradient_accumulation_steps=2,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    acc.train_step((torch.randn(4, 8), torch.randn(4, 4)), mse, "cpu")
    with pytest.raises(RuntimeError, match="accumulation window"):
        acc.state_dict()
    with pytest.raises(RuntimeError, match="accumulation window"):
        acc.load_state_dict(ckpt["trainer"])


def test_truncated_checkpoint_file_raises_and_changes_nothing(tmp_path):
    model, trainer = _trained()
    path = tmp_path / "ckpt.pt"
    torch.save({"trainer": trainer.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a crash while writing without os.replace
    before = _everything(model, trainer)
    # torch.load's own error (OSError "Invalid argument" for a cut zip archive here)
    with pytest.raises((OSError, RuntimeError, EOFError, pickle.UnpicklingError)):
        trainer.load_state_dict(torch.load(path, weights_only=True)["trainer"])
    assert_bitwise_equal(before, _everything(model, trainer))


# the bare scaler and optimizer: each checks its own state dict before changing anything
SCALER_CORRUPTIONS = [(_drop(k), k) for k in ("scale", "growth_factor", "backoff_factor",
                                               "growth_interval", "_growth_tracker")] + [
    (_set(("scale",), "big"), "scale"), (_set(("scale",), math.nan), "scale"),
    (_set(("scale",), torch.ones(2)), "scale"), (_set(("_growth_tracker",), 1.5), "_growth_tracker"),
    (_set(("_hysteresis_tracker",), 7), "exceeds"), (_set(("skipped_steps",), None), "skipped_steps"),
    (_set(("growth_factor",), 0.5), "growth_factor"), (_set(("min_scale",), -1.0), "min_scale"),
]
OPTIMIZER_CORRUPTIONS = [
    (lambda sd: sd["param_groups"][0].pop("params"), "'params' list"),
    (_set(("param_groups", 0, "betas"), 0.9), "betas"),
    (_set(("param_groups", 0, "amsgrad"), "yes"), "amsgrad"),
    (_set(("param_groups", 0, "rng_state"), torch.zeros(2)), "rng_state"),
    (lambda sd: sd["state"][0].pop("step"), "step"),
    (_set(("state", 0, "step"), "x"), "step"),
    (_set(("state", 1, "exp_avg"), torch.zeros(16, dtype=torch.complex64)), "floating"),
    (_set(("state", 2, "master"), torch.zeros(3, 4)), "shape"),
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups"),
]


@pytest.mark.parametrize("corrupt,match", SCALER_CORRUPTIONS + OPTIMIZER_CORRUPTIONS,
                         ids=[f"scaler-{m}" for _, m in SCALER_CORRUPTIONS]
                         + [f"optimizer-{m}" for _, m in OPTIMIZER_CORRUPTIONS])
def test_corrupted_scaler_or_optimizer_state_changes_nothing(corrupt, match):
    model = mlp(torch.float16, seed=0)
    opt = AdamW(model.parameters(), lr=1e-2, stochastic_rounding=True, master_weights=True)
    scaler = amp_engine.GradScaler("cpu", init_scale=2.0**8, hysteresis=2, growth_interval=2)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(mse(model(torch.randn(4, 8).half()), torch.zeros(4, 4))).backward()
        scaler.step(opt)
        scaler.update()
    target = scaler if (corrupt, match) in SCALER_CORRUPTIONS else opt
    sd = copy.deepcopy(target.state_dict())
    corrupt(sd)
    before = (snapshot(model, opt), scaler.state_dict(), opt.state_dict()["param_groups"])
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    assert_bitwise_equal(before, (snapshot(model, opt), scaler.state_dict(),
                                  opt.state_dict()["param_groups"]))
