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

The scale is kept at 1.0 (huge growth interval) and max_norm is large so that the
timed loops leave the grads unchanged: unscaling the same grads again and again
would drive them subnormal (50x slower on CPUs) and measure nothing useful.
"""
from __future__ import annotations

import torch

from amp_engine import ops
from amp_engine.bench.common import (Row, arg_parser, environment, finish_rows, markdown_table,
                                     time_fn, write_results)
from amp_engine.scaler import GradScaler

TORCH = "torch.amp.GradScaler"


class _NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step() does nothing: isolates the scaler's cost."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class _NullFusedOptimizer(_NullOptimizer):
    _step_supports_amp_scaling = True  # torch's fused contract: grad_scale + found_inf


def _params(n_tensors: int, numel: int, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen).to(device))
        p.grad = torch.randn(numel, generator=gen).to(device)
        params.append(p)
    return params


def _scalers(device):
    kwargs = dict(init_scale=1.0, growth_interval=10**9)
    return [(TORCH, torch.amp.GradScaler(device.type, **kwargs)),
            (f"amp_engine ({ops.available_backends(device)[0]})",
             GradScaler(device.type, **kwargs))]


def bench_overhead(device, n_tensors: int, fused: bool, mrt: float) -> list[Row]:
    params = _params(n_tensors, 64, device)
    loss = torch.ones((), device=device)
    rows = []
    for impl, scaler in _scalers(device):
        opt = (_NullFusedOptimizer if fused else _NullOptimizer)(params)

        def step(scaler=scaler, opt=opt):
            scaler.scale(loss)
            scaler.step(opt)
            scaler.update()

        t = time_fn(step, min_run_time=mrt)
        bench = "step overhead, " + ("fused optimizer" if fused else "plain optimizer")
        rows.append(Row(bench, f"{n_tensors} tensors x 64 fp32", impl, t.median_s * 1e3,
                        t.iqr_s * 1e3, extra={"us_per_tensor": t.median_s * 1e6 / n_tensors}))
    return rows


def bench_recipe(device, n_tensors: int, numel: int, mrt: float) -> list[Row]:
    rows = []
    loss = torch.ones((), device=device)
    n_params = n_tensors * numel
    case = f"{n_tensors} tensors x {numel} fp32 ({n_params / 1e6:g}M)"
    for impl, scaler in _scalers(device):
        params = _params(n_tensors, numel, device)
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
        if isinstance(scaler, GradScaler):
            def step(scaler=scaler, opt=opt):
                scaler.scale(loss)
                scaler.clip_grad_norm_(opt, 1e30)
                scaler.step(opt)
                scaler.update()
        else:
            def step(scaler=scaler, opt=opt, params=params):
                scaler.scale(loss)
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1e30)
                scaler.step(opt)
                scaler.update()
        t = time_fn(step, min_run_time=mrt)
        rows.append(Row("scale+unscale+clip+step+update, fused AdamW", case, impl,
                        t.median_s * 1e3, t.iqr_s * 1e3))
        del params, opt
    return rows


def run(device: str = "cpu", quick: bool = False) -> tuple[list[Row], dict]:
    dev = torch.device(device)
    mrt = 0.2 if quick else 1.0
    rows: list[Row] = []
    for fused in (False, True):
        for n in (10, 1_000, 10_000):
            rows += bench_overhead(dev, n, fused, mrt)
    recipe_cases = [(1_000, 64), (100, 10_000 if quick else 100_000)]
    for n, numel in recipe_cases:
        rows += bench_recipe(dev, n, numel, mrt)
    finish_rows(rows, None, baseline_impl=TORCH)
    return rows, environment(dev)


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    rows, env = run(args.device, args.quick)
    print(f"# bench_scaler on {env.get('gpu', env['cpu'])} ({env['device']}, torch {env['torch']}, "
          f"{env['cpu_threads']} threads, backends {env.get('backends')})\n")
    print(markdown_table(rows))
    path = write_results(args.output, "bench_scaler", rows, env)
    if path:
        print(f"\nwrote {path}")
    return 0
