"""found_inf is MAX-reduced across ranks before any skip decision: an overflow on
one rank only makes every rank skip, with equal scales (2 gloo ranks on the CPU)."""
import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amp_engine.bench.processes import exit_spawned_rank, shutdown_process_group

WORLD = 2


def _opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=0.01, fused=True)
    from .cases import ContractSGD

    return ContractSGD(params, lr=0.1)


def _ddp_run(rank, opt_name, group, clip):
    from amp_engine.scaler import GradScaler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = _opt(opt_name, model.parameters())
    s = GradScaler("cpu", init_scale=2.0**8, growth_interval=2, process_group=group)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))  # per-rank data
    scales, skipped = [], []
    for i in range(6):
        opt.zero_grad()
        s.scale(model(x).pow(2).mean()).backward()
        for p in model.parameters():  # what DDP does: average the grads
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        if i in (1, 4) and rank == i % WORLD:  # an overflow seen by one rank only
            model.weight.grad[0, 0] = math.inf
        if clip:
            s.clip_grad_norm_(opt, 0.5)
        s.step(opt)
        skipped.append(s.last_step_skipped)
        s.update()
        scales.append(s.get_scale())
    return scales, skipped, [p.detach().clone() for p in model.parameters()]


def _dtensor_run(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from amp_engine.scaler import GradScaler

    mesh = init_device_mesh("cpu", (WORLD,))
    w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    opt = torch.optim.SGD([w], lr=0.1)
    s = GradScaler("cpu", init_scale=4.0)  # no process_group: the DTensor mesh is used
    out = []
    for i in range(2):
        s.scale(torch.ones(()))
        w.grad = distribute_tensor(torch.full((4, 3), 4.0), mesh, [Shard(0)])
        if i == 0 and rank == 1:
            w.grad.to_local()[0, 0] = math.inf
        s.step(opt)
        out.append(s.last_step_skipped)
        s.update()
        out.append(s.get_scale())
    out.append(w.to_local().detach().clone())
    # clipping DTensor grads: torch's recipe (unscale_ + clip_grad_norm_) on the full norm
    s.scale(torch.ones(()))
    w.grad = distribute_tensor(torch.full((4, 3), 2.0 * 4.0), mesh, [Shard(0)])  # unscaled 4.0
    norm = s.clip_grad_norm_(opt, 1.0)
    out.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    s.step(opt)
    s.update()
    out.append(w.to_local().detach().clone())
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        for opt_name in ("sgd", "contract", "adamw-fused"):
            results[opt_name] = _ddp_run(rank, opt_name, dist.group.WORLD, clip=False)
        results["contract-clip"] = _ddp_run(rank, "contract", dist.group.WORLD, clip=True)
        results["no-group"] = _ddp_run(rank, "sgd", None, clip=False)
        results["dtensor"] = _dtensor_run(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        shutdown_process_group()
        raise
    exit_spawned_rank()  # results are written: skip gloo's teardown


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_overflow_on_one_rank_skips_on_every_rank(tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-rank gloo run did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name in ("sgd", "contract", "adamw-fused", "contract-clip"):
        (s0, k0, p0), (s1, k1, p1) = r0[name], r1[name]
        assert k0 == k1 == [False, True, False, False, True, False], name
        assert s0 == s1, name
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), name
    # without the reduction the ranks disagree: the test above means something
    assert r0["no-group"][1] != r1["no-group"][1]
    for r in (r0, r1):
        skipped0, scale0, skipped1, scale1, local, norm, clipped = r["dtensor"]
        assert (skipped0, scale0, skipped1, scale1) == (True, 2.0, False, 2.0)
        assert torch.equal(local, torch.full((2, 3), 0.8))  # 1 - 0.1 * (4 / 2)
        assert norm == pytest.approx(4.0 * 12**0.5)  # the norm over both shards
        expected = 0.8 - 0.1 * 4.0 / (4.0 * 12**0.5 + 1e-6)
        torch.testing.assert_close(clipped, torch.full((2, 3), expected))
