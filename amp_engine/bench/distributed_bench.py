"""The AMP optimizer step under FSDP2 on gloo CPU ranks, and eager vs CUDA graph on a GPU.

CPU (``--device cpu``): 1 and 2 gloo ranks (spawned processes, one thread each),
a ``fully_shard`` MLP, grads in place; timed: the step after backward, i.e.
clip to a norm + optimizer step + scale update, collectives included:

  torch ShardedGradScaler:  unscale_ (with a SUM all-reduce of found_inf),
      torch.nn.utils.clip_grad_norm_ (DTensor norm: an all-reduce), torch AdamW
      (foreach: with fused=True this scaler fails under FSDP2 on the CPU in torch
      2.14, "output with shape [] doesn't match the broadcast shape [1]"), update
  torch.amp.GradScaler:     the same with torch's plain scaler and fused AdamW
      (no cross-rank reduction of found_inf: ranks can disagree on a skip)
  amp_engine:               clip_grad_norm_ (one read-only pass; norm² and found_inf
      in one all-reduce), amp_engine AdamW (fused step, unscale and clip inside), update

The scale stays 1.0 and max_norm is huge, so the timed loop leaves the grads as
they are (repeated unscaling would drive them subnormal). Every rank runs the
same number of calls (collectives must match): the calibration is agreed on
with an all-reduce, and each round's time is the slowest rank's.

CUDA (``--device cuda``): one GPU, amp_engine's scaler and ``capturable=True``
AdamW; the whole step (fp16 autocast forward, scale, backward, clip, step,
update) eager vs one CUDA graph replay, with torch's eager recipe beside.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from amp_engine.bench.common import (Row, arg_parser, environment, finish_rows, markdown_table,
                                     time_fn, write_results)
from amp_engine.bench.processes import exit_spawned_rank, shutdown_process_group

SHARDED, PLAIN, OURS = "torch ShardedGradScaler", "torch.amp.GradScaler", "amp_engine"
IMPL_NAMES = {SHARDED: "torch ShardedGradScaler + AdamW (foreach)",
              PLAIN: "torch.amp.GradScaler + AdamW (fused)",
              OURS: "amp_engine GradScaler + AdamW (fused)"}


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ FSDP2 CPU
def _recipes(width: int, depth: int):
    """{impl: post-backward step function} over one fully_shard model each."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    import amp_engine
    from amp_engine.optim import AdamW

    out, keep = {}, []
    for impl in (SHARDED, PLAIN, OURS):
        model = mlp(width, depth)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        x = torch.randn(8, width)
        model(x).pow(2).mean().backward()  # the grads every timed call reads
        params = list(model.parameters())
        kwargs = dict(init_scale=1.0, growth_interval=10**9)
        if impl == OURS:
            opt, scaler = AdamW(params, lr=1e-6), amp_engine.GradScaler("cpu", **kwargs)

            def step(opt=opt, scaler=scaler):
                scaler.clip_grad_norm_(opt, 1e30)
                scaler.step(opt)
                scaler.update()
        else:
            if impl == SHARDED:
                opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
                scaler = ShardedGradScaler("cpu", **kwargs)
            else:
                opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
                scaler = torch.amp.GradScaler("cpu", **kwargs)

            def step(opt=opt, scaler=scaler, params=params):
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1e30)
                scaler.step(opt)
                scaler.update()
        scaler.scale(torch.ones(()))  # creates the scale
        keep.append((model, opt, scaler))
        out[impl] = step
    return out, keep, sum(p.to_local().numel() for p in params), len(params)


def _rank_main(rank: int, world: int, folder: str, width: int, depth: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        fns, keep, n_params, n_tensors = _recipes(width, depth)
        reps = {}
        for impl, fn in fns.items():  # warm up; calibrate a block to ~20 ms, agreed by all ranks
            fn()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            reps[impl] = max(1, int(0.02 / float(t)))
        times = {impl: [] for impl in fns}
        for _ in range(rounds):  # interleaved: every implementation under the same load
            for impl, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(reps[impl]):
                    fn()
                t = torch.tensor([(time.perf_counter() - t0) / reps[impl]], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
                times[impl].append(float(t))
        if rank == 0:
            torch.save({"times": times, "local_params": n_params, "n_tensors": n_tensors},
                       os.path.join(folder, "result.pt"))
    except BaseException:
        shutdown_process_group()
        raise
    exit_spawned_rank()  # results are written: skip gloo's teardown


def bench_fsdp2(world: int, width: int, depth: int, rounds: int, timeout: float = 300) -> list[Row]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="amp_engine_bench_") as folder:
        ctx = mp.start_processes(_rank_main, args=(world, folder, width, depth, rounds),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world}-rank benchmark did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        res = torch.load(os.path.join(folder, "result.pt"), weights_only=False)
    total = sum(p.numel() for p in mlp(width, depth).parameters())
    case = f"{world} rank{'s' if world > 1 else ''}, {total / 1e6:.2f}M params in {res['n_tensors']} tensors"
    rows = []
    for impl, ts in res["times"].items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0], ts[0], ts[0])
        rows.append(Row("FSDP2 clip+step+update (gloo)", case, IMPL_NAMES[impl], statistics.median(ts) * 1e3,
                        (q[2] - q[0]) * 1e3, extra={"world": world, "rounds": len(ts),
                                                   "params_per_rank": res["local_params"]}))
    return rows


# ------------------------------------------------------------------ CUDA graph
def bench_cuda_graph(width: int, depth: int, min_run_time: float) -> list[Row]:
    import amp_engine
    from amp_engine.optim import AdamW

    dev = torch.device("cuda")
    x = torch.randn(64, width, device=dev)

    def amp_step(model, opt, scaler, clip):
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if clip == "ours":
            scaler.clip_grad_norm_(opt, 1.0)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    def eager(model, opt, scaler, clip):
        def fn():
            opt.zero_grad(set_to_none=True)
            amp_step(model, opt, scaler, clip)
        return fn

    n_params = sum(p.numel() for p in mlp(width, depth).parameters())
    case = f"MLP {n_params / 1e6:.1f}M params, batch 64, fp16 autocast"
    rows = []
    model = mlp(width, depth).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    t = time_fn(eager(model, opt, torch.amp.GradScaler("cuda"), "torch"), min_run_time=min_run_time)
    rows.append(Row("whole AMP step (CUDA)", case, "torch GradScaler + fused AdamW, eager",
                    t.median_s * 1e3, t.iqr_s * 1e3))
    model = mlp(width, depth).to(dev)
    opt = AdamW(model.parameters(), lr=1e-4, capturable=True)
    scaler = amp_engine.GradScaler("cuda", floor_patience=0)
    step = eager(model, opt, scaler, "ours")
    t = time_fn(step, min_run_time=min_run_time)
    rows.append(Row("whole AMP step (CUDA)", case, "amp_engine, eager", t.median_s * 1e3, t.iqr_s * 1e3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        amp_step(model, opt, scaler, "ours")
    t = time_fn(graph.replay, min_run_time=min_run_time)
    rows.append(Row("whole AMP step (CUDA)", case, "amp_engine, CUDA graph replay",
                    t.median_s * 1e3, t.iqr_s * 1e3))
    return rows


def run(device: str = "cpu", quick: bool = False) -> tuple[list[Row], dict]:
    """Rows and environment: FSDP2 on 1 and 2 gloo ranks (CPU) or eager vs graph (CUDA)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        width, depth = (256, 4) if quick else (1024, 8)
        rows = bench_cuda_graph(width, depth, 0.2 if quick else 1.0)
        finish_rows(rows, None, baseline_impl="torch GradScaler + fused AdamW, eager")
        return rows, environment(dev)
    width, depth, rounds = (128, 4, 5) if quick else (512, 6, 15)
    rows = []
    for world in (1, 2):
        rows += bench_fsdp2(world, width, depth, rounds)
    finish_rows(rows, None, baseline_impl=IMPL_NAMES[SHARDED])
    env = environment(dev)
    env["cpu_threads"] = 1  # per rank
    env["ranks"] = [1, 2]
    return rows, env


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    rows, env = run(args.device, args.quick)
    print(f"# bench_distributed on {env.get('gpu', env['cpu'])} ({env['device']}, torch {env['torch']})\n")
    print(markdown_table(rows))
    path = write_results(args.output, "bench_distributed", rows, env)
    if path:
        print(f"\nwrote {path}")
    return 0
