"""GradScaler per-step cost: torch.amp.GradScaler vs amp_engine.GradScaler, same run.

Benches (speedup = torch's time / ours, measured in the same run):
  step overhead, plain optimizer:  scale -> step (unscale + check + one .item()) -> update,
      with an optimizer whose step() does nothing: the scaler's own cost per step.
  step overhead, fused optimizer:  the same with an optimizer flagged
      ``_step_supports_amp_scaling`` (torch's fused contract): the check pass, no sync.
      Both with 10, 1,000 and 10,000 small grads (64 fp32 elements each): the host
      cost per tensor dominates (torch's Python bucketing ≈1.2 µs per tensor).
  full recipe, torch fused AdamW:  torch: scale, unscale_, clip_grad_norm_, step, update;
      ours: scale, clip_grad_norm_, step, update (the clip folded into the step).

Every step sees **fresh grad tensors**, as real training does after
``zero_grad()`` (set_to_none, torch's default): the grads are assigned from a pool
of ``POOL`` sets, new tensor objects each step, so per-step costs that caching by
tensor identity would hide are measured. Assigning them (the harness) is timed on
its own in the same interleaved rounds and subtracted from both scalers' times
(``us_per_tensor`` and the ratio are the scalers' own cost).

The scale is kept at 1.0 (huge growth interval) and max_norm is large so that the
timed loops leave the grads unchanged: unscaling the same grads again and again
would drive them subnormal (50x slower on CPUs) and measure nothing useful.
"""
from __future__ import annotations

import statistics
import time

import torch

from amp_engine import ops
from amp_engine.bench.common import (Row, arg_parser, environment, finish_rows, markdown_table, sync,
                                     write_results)
from amp_engine.scaler import GradScaler

TORCH = "torch.amp.GradScaler"
HARNESS = "harness (grad assignment only)"
POOL = 4  # grad sets cycled through: every step gets other tensor objects


class _NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step() does nothing: isolates the scaler's cost."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class _NullFusedOptimizer(_NullOptimizer):
    _step_supports_amp_scaling = True  # torch's fused contract: grad_scale + found_inf


def paired_times(fns: dict, device, min_run_time: float, clock: str = "wall") -> dict:
    """{impl: (median s, IQR s)} per call, timing the implementations in alternation.

    On a shared machine the load changes from second to second; timing torch's
    and our scaler in interleaved blocks (instead of one after the other) keeps
    both under the same conditions, so their ratio is fair. ``clock="cpu"``
    counts this process's CPU time (all its threads) instead of wall time: on a
    CPU device that is the host time spent, whatever else the machine runs.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    per_call = {name: [] for name in fns}
    reps = {}
    for name, fn in fns.items():  # warm up, and size a block to ~10 ms
        fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        reps[name] = max(1, int(0.01 / max(time.perf_counter() - t0, 1e-7)))
    deadline = time.perf_counter() + min_run_time * len(fns)
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for name, fn in fns.items():
            sync(device)
            t0 = now()
            for _ in range(reps[name]):
                fn()
            sync(device)
            per_call[name].append((now() - t0) / reps[name])
        rounds += 1
    out = {}
    for name, ts in per_call.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = (statistics.median(ts), q[2] - q[0])
    return out


def _params(n_tensors: int, numel: int, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen).to(device))
        p.grad = torch.randn(numel, generator=gen).to(device)
        params.append(p)
    return params


class FreshGrads:
    """Hands each step a new set of grad tensors (what backward makes after
    ``zero_grad(set_to_none=True)``), cycling through ``POOL`` preallocated sets."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.sets = [[p.grad.clone() for p in params] for _ in range(POOL)]
        self.i = 0

    def __call__(self) -> None:
        grads = self.sets[self.i]
        self.i = (self.i + 1) % POOL
        for p, g in zip(self.params, grads):
            p.grad = g


def _scalers(device):
    kwargs = dict(init_scale=1.0, growth_interval=10**9)
    return [(TORCH, torch.amp.GradScaler(device.type, **kwargs)),
            (f"amp_engine ({ops.available_backends(device)[0]})",
             GradScaler(device.type, **kwargs))]


def bench_overhead(device, n_tensors: int, fused: bool, mrt: float, clock: str) -> list[Row]:
    params = _params(n_tensors, 64, device)
    fresh = FreshGrads(params)
    loss = torch.ones((), device=device)
    fns = {HARNESS: fresh}
    for impl, scaler in _scalers(device):
        opt = (_NullFusedOptimizer if fused else _NullOptimizer)(params)

        def step(scaler=scaler, opt=opt):
            fresh()
            scaler.scale(loss)
            scaler.step(opt)
            scaler.update()

        fns[impl] = step
    bench = "step overhead, " + ("fused optimizer" if fused else "plain optimizer")
    times = paired_times(fns, device, mrt, clock)
    harness = times.pop(HARNESS)[0]
    return [Row(bench, f"{n_tensors} tensors x 64 fp32, fresh grads", impl, (med - harness) * 1e3,
                iqr * 1e3, extra={"us_per_tensor": (med - harness) * 1e6 / n_tensors,
                                  "harness_ms": harness * 1e3, "clock": clock})
            for impl, (med, iqr) in times.items()]


def bench_recipe(device, n_tensors: int, numel: int, mrt: float, clock: str) -> list[Row]:
    loss = torch.ones((), device=device)
    case = f"{n_tensors} tensors x {numel} fp32 ({n_tensors * numel / 1e6:g}M)"
    fns, keep = {}, []
    for impl, scaler in _scalers(device):
        params = _params(n_tensors, numel, device)
        fresh = FreshGrads(params)
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
        keep.append((params, opt))
        if isinstance(scaler, GradScaler):
            def step(scaler=scaler, opt=opt, fresh=fresh):
                fresh()
                scaler.scale(loss)
                scaler.clip_grad_norm_(opt, 1e30)
                scaler.step(opt)
                scaler.update()
        else:
            def step(scaler=scaler, opt=opt, params=params, fresh=fresh):
                fresh()
                scaler.scale(loss)
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1e30)
                scaler.step(opt)
                scaler.update()
        fns[impl] = step
    return [Row("scale+unscale+clip+step+update, fused AdamW", case, impl, med * 1e3, iqr * 1e3,
                extra={"clock": clock})
            for impl, (med, iqr) in paired_times(fns, device, mrt, clock).items()]


def run(device: str = "cpu", quick: bool = False, clock: str | None = None) -> tuple[list[Row], dict]:
    dev = torch.device(device)
    clock = clock or ("cpu" if dev.type == "cpu" else "wall")
    mrt = 0.2 if quick else 1.0
    rows: list[Row] = []
    for fused in (False, True):
        for n in (10, 1_000, 10_000):
            rows += bench_overhead(dev, n, fused, mrt, clock)
    recipe_cases = [(1_000, 64), (100, 10_000 if quick else 100_000)]
    for n, numel in recipe_cases:
        rows += bench_recipe(dev, n, numel, mrt, clock)
    finish_rows(rows, None, baseline_impl=TORCH)
    env = environment(dev)
    env["clock"] = clock
    return rows, env


def main(argv=None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads (default: torch's); 1 gives steadier "
                             "numbers on a shared machine")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: process CPU time (default on a CPU device: immune to other "
                             "load on a shared machine); wall: wall time with device syncs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, env = run(args.device, args.quick, args.clock)
    print(f"# bench_scaler on {env.get('gpu', env['cpu'])} ({env['device']}, torch {env['torch']}, "
          f"{env['cpu_threads']} threads, backends {env.get('backends')}, {env['clock']} time)\n")
    print(markdown_table(rows))
    path = write_results(args.output, "bench_scaler", rows, env)
    if path:
        print(f"\nwrote {path}")
    return 0
