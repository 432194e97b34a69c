"""DistributedDataParallel on 2 gloo ranks: amp_engine's GradScaler (``process_group=``)
and fused AdamW keep the ranks identical, equal to one process on the concatenated
batch; the trainer and the demo run under DDP, and the demo runs under torchrun.

One spawn for the in-process scenarios (module fixture); the torchrun test starts
its own two processes, as a user would.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import amp_engine

from .ranks import CollectiveCounter, requires_gloo, run_on_ranks

pytestmark = requires_gloo

STEPS = 6
INF_STEP, NAN_STEP = 2, 4  # found on one rank only (after DDP's all-reduce): rank 1, rank 0


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def rows(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [rows(step, r) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def scenario_loop(rank, world, group):
    """scale / backward / clip / step / update by hand; per step (skipped, scale, norm)."""
    from amp_engine import GradScaler
    from amp_engine.optim import AdamW

    distributed = group != "single"
    model = build()
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = AdamW(model.parameters(), lr=1e-2)
    pg = dist.group.WORLD if group == "world" else None
    scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=2, process_group=pg)
    hist, collectives = [], CollectiveCounter()
    for i in range(STEPS):
        x, y = rows(i, rank) if distributed else global_batch(i, world)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        grads = [p.grad for p in model.parameters()]
        # DDP has averaged the grads: an overflow now is one rank's alone (a rank-local
        # check after the all-reduce, an fp16 cast of the bucket, a hook...)
        if i == INF_STEP and (rank == 1 or not distributed):
            grads[0][0, 0] = math.inf
        if i == NAN_STEP and (rank == 0 or not distributed):
            grads[3][1] = math.nan
        with collectives:
            norm = scaler.clip_grad_norm_(opt, 0.5)
            scaler.step(opt)
            skipped = scaler.last_step_skipped
            scaler.update()
        hist.append((skipped, scaler.get_scale(), float(norm)))
    return {"hist": hist, "params": params(model), "report": scaler.overflow_report(model),
            "collectives": collectives.calls}


def scenario_trainer(rank, world):
    """MixedPrecisionTrainer on a DDP model: fp16 autocast, fused AdamW, clipping,
    the compatibility check, AMP validation and memory tracking all on."""
    out = {}
    for distributed in (True, False):
        model = build()
        if distributed:
            model = nn.parallel.DistributedDataParallel(model)
        trainer = amp_engine.create_mixed_precision_trainer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), dtype="fp16",
            fused_optimizer=True, max_grad_norm=1.0, init_scale=2.0**10)
        res = [trainer.train_step(rows(i, rank) if distributed else global_batch(i, world),
                                  nn.functional.cross_entropy, "cpu") for i in range(4)]
        out[distributed] = {"results": [(r["skipped"], r["scale"], r["grad_norm"]) for r in res],
                            "params": params(model),
                            "process_group": trainer.scaler._process_group is not None,
                            "validation": trainer.validation["passed"]}
    return out


def scenario_demo(rank, world, folder):
    """The demo's multi-process path, inside this (already initialized) process group."""
    from amp_engine.demo import DemoOptions, run_demo

    opts = DemoOptions(steps=3, batch_size=4, dtype="fp16", device="cpu", output=folder, plots=False,
                       progress=False, threads=1, context=16, d_model=32, n_layers=1, n_heads=2)
    lines = []
    result = run_demo(opts, echo=lines.append)
    runs = {name: (r["final_train_loss"], r["final_val_loss"]) for name, r in result["runs"].items()}
    return {"lines": lines, "processes": result["environment"]["processes"], "runs": runs}


def run_all(rank, world, folder):
    return {"loop": scenario_loop(rank, world, "world"),
            "loop_single": scenario_loop(rank, world, "single"),
            "loop_no_group": scenario_loop(rank, world, "none"),
            "trainer": scenario_trainer(rank, world),
            "demo": scenario_demo(rank, world, os.path.join(folder, f"demo{rank}"))}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return folder, run_on_ranks(run_all, str(folder))


def test_one_ranks_overflow_skips_every_rank(ranks):
    _, (r0, r1) = ranks
    expected = [i in (INF_STEP, NAN_STEP) for i in range(STEPS)]
    for r in (r0, r1):
        assert [h[0] for h in r["loop"]["hist"]] == expected
    # scales never diverge (the clip norms are each rank's: inf only where the inf was)
    assert [h[:2] for h in r0["loop"]["hist"]] == [h[:2] for h in r1["loop"]["hist"]]
    assert all(torch.equal(a, b) for a, b in zip(r0["loop"]["params"], r1["loop"]["params"]))
    assert r0["loop"]["collectives"] == STEPS  # one small all-reduce per step, no more
    # without the reduction each rank skips only its own overflow: the ranks drift apart
    assert [h[0] for h in r0["loop_no_group"]["hist"]] != [h[0] for h in r1["loop_no_group"]["hist"]]


def test_ddp_equals_one_process_on_the_concatenated_batch(ranks):
    _, (r0, _) = ranks
    ddp, single = r0["loop"], r0["loop_single"]
    assert [h[:2] for h in ddp["hist"]] == [h[:2] for h in single["hist"]]
    for a, b in zip(ddp["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_overflow_report_agrees_across_ddp_ranks(ranks):
    _, (r0, r1) = ranks
    names = {"module.0.weight": [INF_STEP], "module.2.bias": [NAN_STEP]}
    for r in (r0, r1):
        assert {d["name"]: d["steps"] for d in r["loop"]["report"]} == names


def test_trainer_under_ddp(ranks):
    _, (r0, r1) = ranks
    t0, t1 = r0["trainer"][True], r1["trainer"][True]
    assert t0["process_group"] and not r0["trainer"][False]["process_group"]
    assert t0["validation"] is True  # the AMP validation pass ran through DDP's forward
    assert t0["results"] == t1["results"]
    assert all(torch.equal(a, b) for a, b in zip(t0["params"], t1["params"]))
    single = r0["trainer"][False]
    assert [r[:2] for r in t0["results"]] == [r[:2] for r in single["results"]]
    for a, b in zip(t0["params"], single["params"]):  # fp16 autocast: half vs whole batch GEMMs
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_demo_with_two_ranks_in_a_process_group(ranks):
    folder, (r0, r1) = ranks
    assert r0["demo"]["processes"] == r1["demo"]["processes"] == 2
    assert r0["demo"]["runs"] == r1["demo"]["runs"]  # mean train loss, val loss of equal weights
    assert r0["demo"]["lines"] and not r1["demo"]["lines"]  # rank 0 speaks
    assert (folder / "demo0" / "demo_summary.json").exists()
    assert not (folder / "demo1").exists()  # and writes


def test_demo_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m amp_engine demo ...`, as documented."""
    out = tmp_path / "out"
    package_root = os.path.dirname(os.path.dirname(amp_engine.__file__))  # the amp_engine under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # --standalone: a local rendezvous on a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "amp_engine", "demo", "--steps", "2", "--batch-size", "4", "--dtype", "fp16",
           "--no-plots", "--no-progress", "--output", str(out)]
    # its own session, so that a timeout kills torchrun's workers too
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with 2 ranks did not finish the demo within 180 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("| run | steps/s |") == 1  # one table: rank 0's
    doc = json.loads((out / "demo_summary.json").read_text())
    assert doc["environment"]["processes"] == 2
    assert list(doc["runs"]) == ["fp32", "fp16"]
