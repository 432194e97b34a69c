"""The run loop: the same model, seed and batches, trained once in fp32 and then
with amp_engine's MixedPrecisionTrainer: fp16 (dynamic loss scaling) and bf16, plus
with ``memory_efficient`` a run whose weights, grads and Adam moments are compact
(bf16 weights with stochastic rounding, 8-bit moments: ~6 bytes/param against 16).

On a CPU the default fp16 run is short (CPU_FP16_STEPS): CPUs have no fp16 matrix
math (torch converts every element around a scalar loop: measured 30x slower than
fp32 on an AVX2 CPU), so it is there to show the loss scaler at work (a backoff on
the first overflow, growth after ``growth_interval`` clean steps), not for speed.

Everything goes through the trainer's public API (`MixedPrecisionConfig`,
`MixedPrecisionTrainer.train_step / validate_step / get_amp_stats /
save_amp_stats`): the fp32 run is the same trainer with `enable_amp=False`, so
the comparison isolates mixed precision.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from amp_engine import _optional
from amp_engine.trainer import memory
from amp_engine.demo.corpus import Corpus, batch_offsets, make_batch
from amp_engine.demo.model import CharTransformer, ModelShape
from amp_engine.demo.ranks import Ranks


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 + bf16: ~30 s of CPU time; 45-75 s wall measured on a 2-core AVX512-BF16 machine shared
# with other jobs (CPUs without native bf16 math take ~10x longer for the bf16 run)
DEFAULT_STEPS = 150
# the default fp16 run on a CPU: 20 steps, its scale growing every 4 clean steps, so growth
# and an overflow's backoff both fit in it (measured: 65536 -> 262144 without overflow in 20
# steps at growth_interval 8)
CPU_FP16_STEPS = 20
CPU_FP16_GROWTH_INTERVAL = 4
# `amp-engine demo` without --steps / --batch-size on a CPU with no native bf16 math (no
# AVX512-BF16 or AMX): torch converts every 16-bit matmul around a scalar loop there,
# ~10x slower than fp32 (the full size took 17.5 min on a 2-core AVX2 EPYC), so the CLI
# picks a smaller run that stays near a minute and says so.
EMULATED_CPU_STEPS = 40
EMULATED_CPU_BATCH = 8
DEFAULT_BATCH = 32


@dataclass
class DemoOptions:
    """Everything that shapes a demo run (the CLI flags, plus the model shape)."""

    steps: int = DEFAULT_STEPS
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # auto | bf16 | fp16 | both (fp16 and bf16)
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    output: str = "amp_demo_output"
    plots: bool = True
    threads: int | None = None    # CPU threads; None: hardware.default_threads()
    progress: bool | None = None  # tqdm bars; None: only when stderr is a terminal
    context: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 3e-3
    eval_every: int | None = None  # None: 8 evaluations per run
    eval_batches: int = 4
    growth_interval: int = 100    # short, so the loss scale's growth shows within a demo
    memory_efficient: bool = False  # one more run: compact weights, grads and 8-bit Adam moments
    fp16_steps: int | None = None   # None: all steps, CPU_FP16_STEPS for the CPU default's fp16 run

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context", "d_model", "n_layers", "n_heads", "eval_batches",
                     "growth_interval", "fp16_steps"):
            value = getattr(self, name)
            if value is None and name == "fp16_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an int >= 1")
        if not isinstance(self.memory_efficient, bool):
            raise ValueError(f"memory_efficient={self.memory_efficient!r}: expected a bool")
        if self.dtype not in ("auto", "bf16", "fp16", "both"):
            raise ValueError(f"dtype={self.dtype!r}: allowed 'auto', 'bf16', 'fp16', 'both'")
        if self.device != "auto" and torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: allowed 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r}: expected an int >= 1 or None")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def amp_dtypes(self) -> list[str]:
        """The AMP dtypes to run besides fp32: fp16 (with the loss scaler) and bf16 unless one is chosen."""
        return ["fp16", "bf16"] if self.dtype in ("auto", "both") else [self.dtype]

    def steps_of(self, amp_dtype: str | None) -> int:
        """Steps of a run: all, except the CPU default's fp16 run (CPU_FP16_STEPS, or fp16_steps)."""
        if amp_dtype != "fp16":
            return self.steps
        if self.fp16_steps is not None:
            return min(self.steps, self.fp16_steps)
        return min(self.steps, CPU_FP16_STEPS) if self.short_fp16() else self.steps

    def short_fp16(self) -> bool:
        """The CPU default's fp16 run: few steps, and its scale grows every CPU_FP16_GROWTH_INTERVAL."""
        return self.fp16_steps is None and self.dtype == "auto" and self.resolved_device().type == "cpu"

    def runs(self) -> list["RunSpec"]:
        """fp32, each AMP dtype, and with memory_efficient the compact run (bf16 if run, else fp16)."""
        out = [RunSpec("fp32", None, self.steps)]
        out += [RunSpec(d, d, self.steps_of(d)) for d in self.amp_dtypes()]
        if self.memory_efficient:
            d = "bf16" if "bf16" in self.amp_dtypes() else self.amp_dtypes()[0]
            out.append(RunSpec(f"{d}-lowmem", d, self.steps_of(d), memory_efficient=True))
        fast = min(self.growth_interval, CPU_FP16_GROWTH_INTERVAL)
        return [RunSpec(r.name, r.amp_dtype, r.steps, r.memory_efficient, fast)
                if r.amp_dtype == "fp16" and self.short_fp16() else r for r in out]


def default_size(device: str = "auto", native_bf16: bool | None = None) -> tuple[int, int, str | None]:
    """(steps, batch_size, why) for a demo whose size was not given: DEFAULT_STEPS x
    DEFAULT_BATCH, or the short run on a CPU without native bf16 math (``why`` says so;
    ``native_bf16`` None: read it from this CPU, amp_engine.hardware)."""
    if DemoOptions(device=device).resolved_device().type != "cpu":
        return DEFAULT_STEPS, DEFAULT_BATCH, None
    if native_bf16 is None:
        from amp_engine import hardware

        native_bf16 = hardware.bf16_support()["native_bf16"]
    if native_bf16 is not False:  # native, or unknown: the full demo
        return DEFAULT_STEPS, DEFAULT_BATCH, None
    return EMULATED_CPU_STEPS, EMULATED_CPU_BATCH, (
        f"this CPU has no native bf16/fp16 math (no AVX512-BF16 or AMX): the 16-bit runs are "
        f"emulated, ~10x slower than fp32, so the demo runs {EMULATED_CPU_STEPS} steps of batch "
        f"{EMULATED_CPU_BATCH} (about a minute); --steps {DEFAULT_STEPS} --batch-size "
        f"{DEFAULT_BATCH} runs the full size")


@dataclass(frozen=True)
class RunSpec:
    """One run of the demo: its name, AMP dtype (None: fp32), steps, and memory_efficient."""

    name: str
    amp_dtype: str | None
    steps: int
    memory_efficient: bool = False
    growth_interval: int | None = None  # None: DemoOptions.growth_interval


@dataclass
class RunRecord:
    """Per-step history and measurements of one run (name: "fp32", "bf16", "fp16")."""

    name: str
    step: list
    loss: list
    accuracy: list
    step_time_s: list
    scale: list
    skipped: list
    grad_norm: list
    val_step: list
    val_loss: list
    activation_bytes: int       # bytes autograd saved for backward in one training forward
    state_bytes: int            # parameters + gradients + optimizer state
    peak_bytes: int | None      # CUDA peak allocated during the run (None on CPU)
    wall_s: float               # the whole run, evaluation included
    amp_stats: dict
    state_parts: dict = field(default_factory=dict)  # {"params"|"grads"|"optimizer_state": bytes}
    n_params: int = 0
    memory_efficient: bool = False


def _lr_schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over 10% of the steps, then cosine decay to 10%."""
    warm = max(1, steps // 10)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = (i - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _make_trainer(opts: DemoOptions, spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler):
    from amp_engine import MixedPrecisionConfig, MixedPrecisionTrainer

    fields = dict(
        enable_amp=spec.amp_dtype is not None,
        dtype=DTYPES[spec.amp_dtype or "bf16"],
        growth_interval=spec.growth_interval or opts.growth_interval,
        validate_amp=False,          # the demo compares fp32 and AMP itself, over the whole run
        check_compatibility=False,   # a plain transformer: nothing to find, and it costs a trial pass
        fused_optimizer=True,        # amp_engine's fused AdamW in every run: only the precision differs
        # compact weights (bf16: stochastic rounding, no master) and 8-bit Adam moments
        memory_efficient=spec.memory_efficient,
    )
    config = MixedPrecisionConfig(**fields)
    return MixedPrecisionTrainer(config, model, optimizer, scheduler=scheduler)


def run_one(spec: RunSpec, opts: DemoOptions, corpus: Corpus, train_offsets: torch.Tensor,
            val_offsets: torch.Tensor, echo: Callable[[str], None], ranks: Ranks = Ranks()) -> RunRecord:
    """Train one run (``spec.amp_dtype`` None is the fp32 baseline) on the first
    ``spec.steps`` of the shared batches.

    With several ranks (amp_engine.demo.ranks) the model is in DDP, each rank
    trains on its slice of every batch and the recorded loss is the mean over
    the ranks; rank 0 writes the stats file.
    """
    name, amp_dtype, steps = spec.name, spec.amp_dtype, spec.steps
    device = opts.resolved_device()
    torch.manual_seed(opts.seed)  # identical initial weights in every run
    shape = ModelShape(corpus.vocab_size, opts.context, opts.d_model, opts.n_layers, opts.n_heads)
    model = ranks.wrap(CharTransformer(shape).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(opts.steps))
    trainer = _make_trainer(opts, spec, model, optimizer, scheduler)
    loss_fn = nn.CrossEntropyLoss()
    eval_every = opts.eval_every or max(1, opts.steps // 8)
    rec = RunRecord(name, [], [], [], [], [], [], [], [], [], 0, 0, None, 0.0, {},
                    n_params=sum(p.numel() for p in model.parameters()), memory_efficient=spec.memory_efficient)

    def evaluate() -> float:
        losses = [trainer.validate_step(make_batch(corpus.val, o, opts.context, device), loss_fn, device)["loss"]
                  for o in val_offsets]
        return sum(losses) / len(losses)

    show = ranks.main and (opts.progress if opts.progress is not None else sys.stderr.isatty())
    # tqdm (the demo extra) only for a bar that is shown; a TTY without it shows none
    show = show and (opts.progress is not None or _optional.available("tqdm"))
    tqdm = _optional.require("tqdm.auto", "the demo's progress bars").tqdm if show else _optional.NoBar
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_run = time.perf_counter()
    with tqdm(total=steps, desc=f"{name:>5}", unit="step", disable=not show,
              dynamic_ncols=True, leave=True) as bar:
        for i in range(steps):
            batch = make_batch(corpus.train, train_offsets[i], opts.context, device)
            t0 = time.perf_counter()
            m = trainer.train_step(ranks.local_rows(batch), loss_fn, device)  # floats: synchronized
            dt = time.perf_counter() - t0
            rec.step.append(i + 1)
            rec.loss.append(ranks.mean(float(m["loss"])))
            rec.accuracy.append(m.get("accuracy"))
            rec.step_time_s.append(dt)
            if i == 0 and device.type == "cuda":
                # the first step holds one-off work (the trainer's fp32 reference pass for its
                # memory statistics, allocator warm-up): peak memory is for steady training
                torch.cuda.reset_peak_memory_stats(device)
            rec.scale.append(None if amp_dtype is None else m.get("scale"))
            rec.skipped.append(bool(m.get("skipped", False)))
            rec.grad_norm.append(m.get("grad_norm"))
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                rec.val_step.append(i + 1)
                rec.val_loss.append(evaluate())
            bar.set_postfix(loss=f"{rec.loss[-1]:.3f}", val=f"{rec.val_loss[-1]:.3f}" if rec.val_loss else "-",
                            tok_s=f"{batch[1].numel() / dt:,.0f}", refresh=False)
            bar.update(1)
    rec.wall_s = time.perf_counter() - t_run
    if device.type == "cuda":
        rec.peak_bytes = torch.cuda.max_memory_allocated(device)
    rec.activation_bytes, rec.state_parts = _measure_memory(
        trainer, amp_dtype, make_batch(corpus.train, train_offsets[0], opts.context, device), loss_fn, device)
    rec.state_bytes = sum(rec.state_parts.values())
    rec.amp_stats = trainer.get_amp_stats()
    if ranks.main:
        trainer.save_amp_stats(os.path.join(opts.output, f"amp_stats_{name}.json"))
    trainer.cleanup()
    if not show:
        echo(f"{name}: {steps} steps in {rec.wall_s:.1f} s, last train loss {rec.loss[-1]:.3f}, "
             f"val loss {rec.val_loss[-1]:.3f}")
    return rec


def _measure_memory(trainer, amp_dtype, batch, loss_fn, device) -> tuple[int, dict[str, int]]:
    """(activation bytes, state bytes by part) of one training step in this run's precision.

    Activations: what autograd saves for backward in the forward
    (amp_engine.trainer.memory.SavedTensorMeter: measured, parameters left out).
    State: {"params", "grads", "optimizer_state"} bytes (masters, 8-bit codes and
    their absmax included), counted while the gradients exist.
    """
    model = trainer.model
    x, y = batch
    model.train()
    meter = memory.SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
    with meter, torch.autocast(device.type, dtype=DTYPES[amp_dtype or "bf16"], enabled=amp_dtype is not None):
        loss = loss_fn(model(x), y)
    loss.backward()
    state = {k: v["actual"] for k, v in memory.state_bytes(model, trainer.optimizer).items()}
    model.zero_grad(set_to_none=True)
    return meter.saved_bytes, state


def run_all(opts: DemoOptions, corpus: Corpus, echo: Callable[[str], None],
            ranks: Ranks = Ranks()) -> dict[str, RunRecord]:
    """fp32 first, then each AMP run (DemoOptions.runs); same seed, same batches."""
    train_offsets = batch_offsets(len(corpus.train), opts.context, opts.batch_size, opts.steps, opts.seed)
    val_offsets = batch_offsets(len(corpus.val), opts.context, opts.batch_size, opts.eval_batches, opts.seed + 1)
    records = {}
    for spec in opts.runs():
        records[spec.name] = run_one(spec, opts, corpus, train_offsets, val_offsets, echo, ranks)
    return records


def options_dict(opts: DemoOptions) -> dict:
    return asdict(opts)
