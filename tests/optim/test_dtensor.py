"""DTensor params (FSDP2): the fused step runs on each rank's local shard."""

import pytest
import torch

from amp_engine.optim import SGD, AdamW

dist = pytest.importorskip("torch.distributed")
try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed tensors
    pytest.skip("torch.distributed.tensor unavailable", allow_module_level=True)
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("gloo unavailable", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    # a file store, not a TCP port: nothing to collide with other test runs
    created = not dist.is_initialized()
    if created:
        init_file = tmp_path_factory.mktemp("dist") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


def make(mesh, dtype, sharded):
    torch.manual_seed(0)
    full = [torch.randn(8, 6).to(dtype), torch.randn(6).to(dtype)]
    if not sharded:
        return [torch.nn.Parameter(t) for t in full]
    return [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in full]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", [(AdamW, {"lr": 1e-2}), (SGD, {"lr": 0.1, "momentum": 0.9})])
def test_dtensor_params_match_plain(mesh, dtype, cls, kw):
    runs = []
    for sharded in (True, False):
        params = make(mesh, dtype, sharded)
        opt = cls(params, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(dtype)
                p.grad = distribute_tensor(g, mesh, [Shard(0)]) if sharded else g
            opt.step()
        if sharded:
            assert all(isinstance(p, DTensor) for p in params)
            st = opt.state[params[0]]
            assert isinstance(st["exp_avg" if cls is AdamW else "momentum_buffer"], DTensor)
            if dtype == torch.bfloat16:
                assert isinstance(st["master"], DTensor) and st["master"].dtype == torch.float32
            params = [p.full_tensor() for p in params]
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dtensor_checkpoint_round_trip(mesh):
    params = make(mesh, torch.bfloat16, True)
    opt = AdamW(params, lr=1e-2)
    for p in params:
        p.grad = distribute_tensor(torch.ones(p.shape, dtype=torch.bfloat16), mesh, [Shard(0)])
    opt.step()
    sd = opt.state_dict()
    opt2 = AdamW(params, lr=1e-2)
    opt2.load_state_dict(sd)
    st = opt2.state[params[0]]
    assert isinstance(st["master"], DTensor) and st["master"].dtype == torch.float32
    assert torch.equal(st["master"].full_tensor(), opt.state[params[0]]["master"].full_tensor())
