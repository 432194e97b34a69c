"""Fault injection: ~1,500 training steps with inf/-inf/nan written into random grad
elements, non-finite losses, finite grads that overflow only once unscaled, faults
in the middle of gradient accumulation and a run of 200 consecutive faults.

Checked on every step, for fp32, fp16+master and bf16 params (masters, or
stochastic rounding without), through the bare GradScaler + optimizer and through
MixedPrecisionTrainer:

* a faulty step is skipped: params, masters, moments, step counters and the SR
  generator are bitwise unchanged (state a skipped first step creates holds its
  initial values), and the scale follows the documented rule (faults.ScaleRule);
* a clean step is applied, its params are finite, and the whole trajectory is
  bitwise that of a reference run (same model, same optimizer) that simply never
  saw the faulty steps, given the scale the rule says.

Compact moments (bf16, 8-bit blocks) run too: the 8-bit runs lower the size under
which moments stay fp32 (4,096) to 64, so that the MLP's weights get 8-bit codes in
one ragged block each; a skipped step leaves codes and absmax bitwise unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

import amp_engine
from amp_engine.trainer.conversion import memory_efficient_options
from amp_engine.ops import available_backends, moments8, optim_backends
from amp_engine.optim import SGD, AdamW

from .faults import (FaultPlan, Injector, ScaleRule, assert_same_bits, batch, mlp, mse,
                     optimizer_tensors, snapshot)


@dataclass
class Run:
    name: str
    dtype: torch.dtype  # bare: the params' dtype; trainer: the autocast dtype
    optimizer: str
    steps: int
    path: str = "bare"
    accumulate: int = 1
    scaler: dict = field(default_factory=dict)
    forced: range = range(0)
    rate: float = 0.3
    memory_efficient: bool = False  # trainer: low-precision weights
    backend: str | None = None  # optimizer ops
    scaling_backend: str | None = None  # scaler's ops (AMP_ENGINE_BACKEND)
    seed: int = 0
    min_quantized: int | None = None  # moments8.MIN_QUANTIZED_NUMEL for the run


# scale between 2**-8 and 2**4: both regimes (inv_scale < 1 and > 1) occur
NEAR_ONE = dict(init_scale=2.0, growth_interval=3, min_scale=2.0**-8, max_scale=16.0)
RUN_200 = dict(growth_interval=3)  # torch's defaults otherwise: from 2**16 to the floor 2**-24

OPTIMIZERS = {
    "adamw": lambda ps, be: AdamW(ps, lr=1e-2, weight_decay=0.01, backend=be),
    "adamw_sr": lambda ps, be: AdamW(ps, lr=1e-2, stochastic_rounding=True, backend=be),
    "sgd": lambda ps, be: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                              backend=be),
    "torch_sgd": lambda ps, be: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "torch_adamw": lambda ps, be: torch.optim.AdamW(ps, lr=1e-2),
    "adamw8": lambda ps, be: AdamW(ps, lr=1e-2, weight_decay=0.01, exp_avg_dtype=U8,
                                   exp_avg_sq_dtype=U8, backend=be),
    "adamw8_sr": lambda ps, be: AdamW(ps, lr=1e-2, stochastic_rounding=True, exp_avg_dtype=U8,
                                      exp_avg_sq_dtype=U8, backend=be),
    "adamw_bf16m": lambda ps, be: AdamW(ps, lr=1e-2, weight_decay=0.01,
                                        exp_avg_dtype=torch.bfloat16,
                                        exp_avg_sq_dtype=torch.bfloat16, backend=be),
}
U8 = torch.uint8
SMALL_BLOCKS = 64  # 8-bit moments for the MLP's weights (128 and 64 elements)

RUNS = [
    Run("fp32-adamw", torch.float32, "adamw", 150, scaler=NEAR_ONE),
    Run("fp32-adamw-reference-ops", torch.float32, "adamw", 60, scaler=NEAR_ONE,
        backend="reference", scaling_backend="reference", seed=1),
    Run("fp32-torch-sgd", torch.float32, "torch_sgd", 100, scaler=NEAR_ONE, seed=2),
    Run("fp32-torch-adamw-accum3", torch.float32, "torch_adamw", 60, accumulate=3,
        scaler=NEAR_ONE, seed=3),
    Run("fp16-master-adamw-accum2", torch.float16, "adamw", 120, accumulate=2,
        scaler=NEAR_ONE, seed=4),
    Run("bf16-master-sgd", torch.bfloat16, "sgd", 100, scaler=NEAR_ONE, seed=5),
    Run("bf16-sr-adamw-hysteresis", torch.bfloat16, "adamw_sr", 100,
        scaler=dict(NEAR_ONE, hysteresis=2), seed=6),
    Run("fp16-master-200-faults", torch.float16, "adamw", 250, scaler=RUN_200,
        forced=range(20, 220), rate=0.1, seed=7),
    Run("trainer-fp16", torch.float16, "adamw", 100, path="trainer", accumulate=2,
        scaler=dict(growth_interval=3), seed=8),
    Run("trainer-fp16-master", torch.float16, "adamw", 100, path="trainer",
        memory_efficient=True, scaler=dict(NEAR_ONE, init_scale=4.0), seed=9),
    Run("trainer-bf16-sr", torch.bfloat16, "adamw", 100, path="trainer", memory_efficient=True,
        accumulate=2, seed=10),
    Run("trainer-fp16-200-faults", torch.float16, "adamw", 240, path="trainer",
        scaler=RUN_200, forced=range(10, 210), rate=0.1, seed=11),
]
# compact moments, through the default op backend ("cpp" when built) and the reference
RUNS += [
    Run("fp32-adamw-8bit", torch.float32, "adamw8", 100, scaler=NEAR_ONE, seed=14,
        min_quantized=SMALL_BLOCKS),
    Run("bf16-sr-adamw-8bit", torch.bfloat16, "adamw8_sr", 80, scaler=NEAR_ONE, seed=15,
        min_quantized=SMALL_BLOCKS),
    Run("fp16-master-adamw-bf16-moments-accum2", torch.float16, "adamw_bf16m", 60,
        accumulate=2, scaler=NEAR_ONE, seed=16),
    Run("fp16-master-adamw-8bit-reference-ops", torch.float16, "adamw8", 40, scaler=NEAR_ONE,
        backend="reference", scaling_backend="reference", seed=17, min_quantized=SMALL_BLOCKS),
]
if "triton" in available_backends("cpu", "adam_step_compact_"):
    RUNS.append(Run("bf16-sr-adamw-8bit-triton", torch.bfloat16, "adamw8_sr", 20,
                    scaler=NEAR_ONE, backend="triton", seed=18, min_quantized=SMALL_BLOCKS))
# the Triton kernels run interpreted on the CPU: a short run through them
if "triton" in available_backends("cpu") and "triton" in optim_backends("cpu"):
    RUNS.append(Run("fp16-master-adamw-triton", torch.float16, "adamw", 30, scaler=NEAR_ONE,
                    backend="triton", scaling_backend="triton", seed=12))
# the scaler's ops on every other CPU backend too (the compiled ones when built)
RUNS += [Run(f"fp16-sgd-{b}-ops", torch.float16, "sgd", 60, scaler=NEAR_ONE,
             scaling_backend=b, seed=13) for b in available_backends("cpu") if b not in ("reference", "triton")]


def _reference_optimizer(run: Run, model, opt):
    ref_model = copy.deepcopy(model)
    if run.path == "bare":
        ref_opt = OPTIMIZERS[run.optimizer](ref_model.parameters(), run.backend)
    else:
        if run.memory_efficient:
            for p in ref_model.parameters():
                p.data = p.data.to(run.dtype)
        extra = memory_efficient_options(run.dtype) if run.memory_efficient else {}
        ref_opt = AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01, **extra)
    for g, rg in zip(opt.param_groups, ref_opt.param_groups):
        if "rng_state" in g:  # the same stochastic-rounding stream
            rg["rng_state"] = g["rng_state"].clone()
    return ref_model, ref_opt


def _reference_step(run: Run, model, opt, step: int, scale: float) -> None:
    """The documented recipe for one clean step at `scale` (no scaler, no checks)."""
    s = torch.tensor(scale, dtype=torch.float32)
    for k in range(run.accumulate):
        x, y = batch(step, k, run.seed)
        if run.path == "bare":
            loss = mse(model(x.to(run.dtype)), y)
        else:
            with torch.autocast("cpu", dtype=run.dtype):
                loss = mse(model(x), y)
        ((loss / run.accumulate) * s).backward()
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale = s
        opt.step()
        del opt.grad_scale
    else:
        inv = s.double().reciprocal().float()
        for p in model.parameters():
            p.grad.mul_(inv)
        opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_skipped(before: dict, model, opt, step: int) -> None:
    """Nothing changed; state the skipped step created holds its initial values."""
    after = snapshot(model, opt)
    assert_same_bits(before, {k: after[k] for k in before}, f"skipped step {step}")
    params = list(model.parameters())
    new = optimizer_tensors(opt)
    for key in after.keys() - before.keys():
        t = new[key]
        if key.endswith(".master"):
            p = params[int(key.split(".")[1])]  # one param group here
            assert torch.equal(t, p.detach().float()), key
        else:
            assert not t.any(), f"{key} created non-zero by a skipped step"


class Harness:
    def __init__(self, run: Run) -> None:
        self.run = run
        if run.path == "bare":
            self.model = mlp(run.dtype, run.seed)
            self.opt = OPTIMIZERS[run.optimizer](self.model.parameters(), run.backend)
            self.scaler = amp_engine.GradScaler("cpu", floor_patience=0, **run.scaler)
            self.rule = ScaleRule(**run.scaler)
        else:
            self.model = mlp(torch.float32, run.seed)
            opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
            bf16 = run.dtype == torch.bfloat16
            self.trainer = amp_engine.create_mixed_precision_trainer(
                self.model, opt, dtype=run.dtype, memory_efficient=run.memory_efficient,
                fused_optimizer=True, gradient_accumulation_steps=run.accumulate,
                floor_patience=10**6, log_amp_stats=False, check_compatibility=False,
                validate_amp=False, track_memory_usage=False, **run.scaler)
            self.opt = self.trainer.optimizer
            # bf16: the trainer pins the scale at 1.0 (checks and skips all the same)
            self.rule = ScaleRule(1.0, min_scale=1.0, max_scale=1.0) if bf16 else ScaleRule(**run.scaler)
        self.ref_model, self.ref_opt = _reference_optimizer(run, self.model, self.opt)
        self.injector = Injector(self.model)
        self.plan = FaultPlan(run.seed, run.rate, run.accumulate, len(self.injector.params),
                              forced=run.forced)
        # the trainer converts memory-efficient weights during step 0: faults from step 1
        self.first = 1 if run.path == "trainer" else 0

    def grad_dtypes(self):
        if self.run.path == "trainer" and self.run.memory_efficient:
            return [self.run.dtype] * len(self.injector.params)
        return [p.dtype for p in self.model.parameters()]

    def step(self, step: int, fault) -> bool:
        """One optimizer step (accumulate micro-batches); returns whether it was skipped."""
        run, inj = self.run, self.injector
        if run.path == "trainer":
            loss_fn = lambda out, y: inj.loss(mse(out, y))  # noqa: E731
            for k in range(run.accumulate):
                inj.arm(fault if fault is not None and fault.micro == k else None)
                out = self.trainer.train_step(batch(step, k, run.seed), loss_fn, "cpu")
            assert out["optimizer_step"]
            return out["skipped"]
        self.opt.zero_grad(set_to_none=True)
        for k in range(run.accumulate):
            inj.arm(fault if fault is not None and fault.micro == k else None)
            x, y = batch(step, k, run.seed)
            loss = inj.loss(mse(self.model(x.to(run.dtype)), y))
            self.scaler.scale(loss / run.accumulate).backward()
            assert self.scaler.get_scale() == self.rule.scale  # constant within the window
        self.scaler.step(self.opt)
        skipped = self.scaler.last_step_skipped
        self.scaler.update()
        return skipped

    def scale(self) -> float:
        scaler = self.scaler if self.run.path == "bare" else self.trainer.scaler
        return scaler.get_scale()


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_faults_change_nothing_and_clean_steps_match_the_reference(run, monkeypatch):
    if run.scaling_backend is not None:
        monkeypatch.setenv("AMP_ENGINE_BACKEND", run.scaling_backend)
    if run.min_quantized is not None:
        monkeypatch.setattr(moments8, "MIN_QUANTIZED_NUMEL", run.min_quantized)
    h = Harness(run)
    faults, scales = 0, []
    for step in range(run.steps):
        scale = h.rule.scale
        fault = h.plan.fault(step, scale, h.grad_dtypes()) if step >= h.first else None
        before = snapshot(h.model, h.opt)
        fired = h.injector.fired
        skipped = h.step(step, fault)
        assert h.injector.fired == fired + (fault is not None), "the fault was not injected"
        assert skipped == (fault is not None), f"step {step}: fault {fault}, skipped {skipped}"
        h.rule.update(fault is not None)
        scales.append(h.scale())
        assert h.scale() == h.rule.scale, f"step {step}: scale {h.scale()} != rule {h.rule.scale}"
        if fault is not None:
            faults += 1
            _assert_skipped(before, h.model, h.opt, step)
            continue
        assert all(torch.isfinite(p).all() for p in h.model.parameters()), f"step {step}"
        _reference_step(run, h.ref_model, h.ref_opt, step, scale)
        assert_same_bits(snapshot(h.ref_model, h.ref_opt), snapshot(h.model, h.opt),
                         f"clean step {step} vs the reference")
    assert faults >= (len(run.forced) or run.steps // 10)
    if run.optimizer.startswith("adamw8"):  # the 8-bit format was really exercised
        state = optimizer_tensors(h.opt)
        assert any(t.dtype == U8 and t.any() for t in state.values())
        assert any(k.endswith("absmax") for k in state)
    if run.forced:  # the scale sat at its floor, and the clean steps after it trained
        assert min(scales) == h.rule.lo == amp_engine.ops.DEFAULT_MIN_SCALE
    if run.path == "trainer":
        stats = h.trainer.get_amp_stats()
        assert stats["skipped_steps"] == faults and stats["optimizer_steps"] == run.steps
        assert stats["fallback_reason"] is None
    else:
        assert h.scaler.stats()["skipped_steps"] == faults


def test_enough_steps():
    assert sum(r.steps for r in RUNS) >= 1000
