"""FSDP2 (``fully_shard``: DTensor params and grads) on 2 gloo ranks with amp_engine's
GradScaler and fused AdamW: ranks skip together, the clip norm is the norm over every
shard, overflow attribution names the parameter whichever rank holds the shard, the
result equals a single process on the concatenated batch, and a distributed
checkpoint (torch.distributed.checkpoint state dicts) resumes exactly.

One spawn for the whole file: the fixture runs every scenario once, the tests read
the results.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .ranks import CollectiveCounter, requires_gloo, run_on_ranks

pytestmark = requires_gloo

STEPS = 6
INF_STEP, NAN_STEP = 2, 4  # an inf in rank 1's shard of 0.weight, a NaN in rank 0's of 2.bias


def build(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def shard(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, **kwargs)
    return fully_shard(model, **kwargs)


def batch(step: int, rank: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank)).to(dtype)


def full(t) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(model, opt, scaler, steps, rank, world, *, sharded, dtype=torch.float32, first=0):
    """steps of scale / backward / clip / step / update; per step (skipped, scale, norm)."""
    out = []
    for i in range(first, first + steps):
        # each rank its 4 rows; the single-process reference takes all of them
        x = batch(i, rank, dtype) if sharded else torch.cat([batch(i, r, dtype) for r in range(world)])
        opt.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        w, b = model[0].weight.grad, model[2].bias.grad
        if i == INF_STEP and (rank == 1 or not sharded):
            (w.to_local() if sharded else w)[-1, 0] = math.inf  # rank 1 holds the last rows
        if i == NAN_STEP and (rank == 0 or not sharded):
            (b.to_local() if sharded else b)[0] = math.nan  # rank 0 holds the first entries
        norm = scaler.clip_grad_norm_(opt, 0.5)
        scaler.step(opt)
        skipped = scaler.last_step_skipped
        scaler.update()
        out.append((skipped, scaler.get_scale(), float(norm)))
    return out


def nan_equal(hist):
    """The history with NaN norms made comparable (NaN != NaN)."""
    return [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in h) for h in hist]


def _scaler():
    from amp_engine import GradScaler

    return GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def scenario_skip(rank, world):
    """FSDP2 vs the same training in one process on the concatenated batch."""
    from amp_engine.optim import AdamW

    res = {}
    for sharded in (True, False):
        model = shard(build()) if sharded else build()
        opt = AdamW(model.parameters(), lr=1e-2)
        scaler = _scaler()
        before = None
        hist, collectives = [], []
        for i in range(STEPS):
            if i == INF_STEP:
                before = [full(p) for p in model.parameters()]
            with CollectiveCounter() as counter:
                hist += _train(model, opt, scaler, 1, rank, world, sharded=sharded, first=i)
            collectives.append(counter.calls)
            if i == INF_STEP:
                res[f"unchanged_{sharded}"] = all(torch.equal(a, full(p)) for a, p in
                                                  zip(before, model.parameters()))
        res[f"hist_{sharded}"] = hist
        res[f"collectives_{sharded}"] = collectives
        res[f"params_{sharded}"] = [full(p) for p in model.parameters()]
        res[f"report_{sharded}"] = scaler.overflow_report(model)
        res[f"stats_{sharded}"] = scaler.stats()
        if sharded:
            res["local_shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]
            res["state_types"] = sorted({type(v).__name__ for st in opt.state.values()
                                         for v in st.values()})
    return res


def scenario_hsdp(rank, world):
    """HSDP layout (a 2-D mesh: replicate x shard, here 1 x 2): norms summed over the shard
    dimension only, found_inf reduced over both."""
    from torch.distributed.device_mesh import init_device_mesh

    from amp_engine.distributed import dtensor_layout
    from amp_engine.optim import AdamW

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = shard(build(), mesh=mesh)
    opt, scaler = AdamW(model.parameters(), lr=1e-2), _scaler()
    hist = _train(model, opt, scaler, STEPS, rank, world, sharded=True)
    return {"layout": dtensor_layout(model.parameters())[1], "hist": hist,
            "params": [full(p) for p in model.parameters()]}


def scenario_checkpoint(rank, world, folder):
    """bf16 params with fp32 masters: save at step 3 (after a skip), resume, compare bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from amp_engine.optim import AdamW

    def make(seed):
        model = shard(build(seed, torch.bfloat16))
        return model, AdamW(model.parameters(), lr=1e-2), _scaler()

    def snapshot(model, opt, scaler):
        state = {k: {n: full(v) for n, v in st.items()} for k, st in
                 get_state_dict(model, opt)[1]["state"].items()}
        return [full(p) for p in model.parameters()], state, scaler.state_dict()

    model, opt, scaler = make(0)
    _train(model, opt, scaler, 3, rank, world, sharded=True, dtype=torch.bfloat16)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "scaler": scaler.state_dict()}, checkpoint_id=folder)
    straight = _train(model, opt, scaler, 3, rank, world, sharded=True, dtype=torch.bfloat16, first=3)
    expected = snapshot(model, opt, scaler)

    model, opt, scaler = make(1)  # other weights: only the checkpoint can make them equal
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "scaler": scaler.state_dict()}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scaler.load_state_dict(state["scaler"])
    master = opt.state[model[0].weight]["master"]
    kinds = (type(master).__name__, master.dtype)
    resumed = _train(model, opt, scaler, 3, rank, world, sharded=True, dtype=torch.bfloat16, first=3)
    return {"straight": straight, "resumed": resumed, "expected": expected,
            "got": snapshot(model, opt, scaler), "master": kinds}


def scenario_trainer(rank, world):
    """MixedPrecisionTrainer on an FSDP2 model (fp16 autocast, fused AdamW, clipping)."""
    import amp_engine

    model = shard(build())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = amp_engine.create_mixed_precision_trainer(
        model, opt, dtype="fp16", fused_optimizer=True, max_grad_norm=1.0, init_scale=2.0**10,
        check_compatibility=False, validate_amp=False, track_memory_usage=False)
    y = torch.zeros(4, dtype=torch.long)
    out = [trainer.train_step((batch(i, rank), y), nn.functional.cross_entropy, "cpu")
           for i in range(3)]
    return {"results": [(r["skipped"], r["scale"], r["grad_norm"]) for r in out],
            "optimizer": type(trainer.optimizer).__module__,
            "params": [full(p) for p in model.parameters()]}


def run_all(rank, world, folder):
    return {"skip": scenario_skip(rank, world), "checkpoint": scenario_checkpoint(rank, world, folder),
            "trainer": scenario_trainer(rank, world), "hsdp": scenario_hsdp(rank, world)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(run_all, str(tmp_path_factory.mktemp("dcp")))


def test_fsdp2_shards_params_and_optimizer_state(ranks):
    r0 = ranks[0]["skip"]
    assert r0["local_shapes"] == [(8, 8), (8,), (2, 16), (2,)]  # half of each param per rank
    assert "DTensor" in r0["state_types"]  # moments are sharded like the params


def test_overflow_in_one_shard_skips_every_rank(ranks):
    r0, r1 = ranks[0]["skip"], ranks[1]["skip"]
    skipped = [i in (INF_STEP, NAN_STEP) for i in range(STEPS)]
    for r in (r0, r1):
        assert [h[0] for h in r["hist_True"]] == skipped
        assert r["unchanged_True"]  # the skipped step changed no parameter
        assert r["stats_True"]["skipped_steps"] == 2
    assert nan_equal(r0["hist_True"]) == nan_equal(r1["hist_True"])  # same skips, scales, norms
    # one all-reduce per step carries found_inf, the clip norm and the overflow counts
    assert r0["collectives_True"] == r1["collectives_True"] == [1] * STEPS
    assert r0["collectives_False"] == [0] * STEPS  # one process: nothing to reduce
    assert [h[1] for h in r0["hist_True"]] == [1024.0, 2048.0, 1024.0, 1024.0, 512.0, 512.0]
    assert all(torch.equal(a, b) for a, b in zip(r0["params_True"], r1["params_True"]))


def test_fsdp2_equals_one_process_on_the_concatenated_batch(ranks):
    r = ranks[0]["skip"]
    sharded, single = r["hist_True"], r["hist_False"]
    assert [h[:2] for h in sharded] == [h[:2] for h in single]
    for (_, _, a), (_, _, b) in zip(sharded, single):
        # the clip norm covers every shard: the squares are summed over the ranks
        assert a == pytest.approx(b, rel=1e-5) or (math.isnan(a) and math.isnan(b))
    for a, b in zip(r["params_True"], r["params_False"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hsdp_layout_reduces_norms_over_the_shard_dimension(ranks):
    for r in ranks:
        h = r["hsdp"]
        assert h["layout"] == (False, True)
        assert nan_equal(h["hist"]) == nan_equal(r["skip"]["hist_True"])
        assert all(torch.equal(a, b) for a, b in zip(h["params"], r["skip"]["params_True"]))


def test_overflow_report_names_the_parameter_on_every_rank(ranks):
    expected = [{"name": "0.weight", "count": 1, "steps": [INF_STEP]},
                {"name": "2.bias", "count": 1, "steps": [NAN_STEP]}]
    for r in ranks:
        # the inf lives in rank 1's shard, the NaN in rank 0's: both ranks name both
        assert r["skip"]["report_True"] == expected
    assert ranks[0]["skip"]["report_False"] == expected


def test_distributed_checkpoint_resumes_exactly(ranks):
    for r in ranks:
        c = r["checkpoint"]
        assert c["master"] == ("DTensor", torch.float32)  # fp32 masters of bf16 shards
        assert nan_equal(c["resumed"]) == nan_equal(c["straight"])
        (p_exp, s_exp, sc_exp), (p_got, s_got, sc_got) = c["expected"], c["got"]
        assert all(torch.equal(a, b) for a, b in zip(p_exp, p_got))
        assert s_exp.keys() == s_got.keys()
        for k in s_exp:
            assert s_exp[k].keys() == s_got[k].keys() and "master" in s_exp[k]
            for n in s_exp[k]:
                assert s_exp[k][n].dtype == s_got[k][n].dtype and torch.equal(s_exp[k][n], s_got[k][n]), (k, n)
        assert sc_exp == sc_got


def test_trainer_runs_under_fsdp2(ranks):
    r0, r1 = ranks[0]["trainer"], ranks[1]["trainer"]
    assert r0["optimizer"] == "amp_engine.optim.adamw"
    assert r0["results"] == r1["results"]
    assert all(isinstance(n, float) and n > 0 for _, _, n in r0["results"])
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
