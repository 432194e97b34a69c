"""The trainer on a GPU: fp16 with the scaler, bf16, memory from the CUDA allocator.

Skipped without CUDA (run by scripts/gpu_check.sh on a GPU machine).
"""
import pytest
import torch
from torch import nn

from .helpers import CE, batches, blobs, make_trainer
from .test_trainer_step import SyncCounter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(width=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3)).cuda()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_learns_on_cuda_with_one_sync_per_step(monkeypatch, dtype):
    x, y = blobs(1024, d_in=32)
    loader = batches(x, y, 128)
    model = _model()
    t = make_trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), dtype=dtype,
                     fused_optimizer=True, max_grad_norm=1.0, validate_amp=True, check_compatibility=True)
    for batch in loader:
        t.train_step(batch, CE, "cuda")
    counter = SyncCounter(monkeypatch)
    for _ in range(3):
        for batch in loader:
            out = t.train_step(batch, CE, "cuda")
    assert counter.calls == ["tolist"] * (3 * len(loader))
    assert out["amp"] and out["accuracy"] > 0.85
    assert t.get_amp_stats()["validation"]["passed"]


def test_cuda_memory_is_measured_with_the_allocator():
    x, y = blobs(2048, d_in=32)
    model = _model(1024)
    t = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), dtype="fp16",
                     track_memory_usage=True)
    t.train_step((x, y), CE, "cuda")
    s = t.get_amp_stats()
    m = s["last_memory_measurement"]
    assert m["method"] == "cuda_peak_allocated"
    assert 0 < m["activations_amp_bytes"] < m["activations_fp32_bytes"]
    assert s["avg_memory_savings"] > 0 and s["peak_memory_bytes"] > 0


def test_fp16_overflow_skips_on_the_device():
    model = _model()
    t = make_trainer(model, torch.optim.AdamW(model.parameters()), dtype="fp16", fused_optimizer=True)
    x, y = blobs(64, d_in=32)
    before = [p.detach().clone() for p in model.parameters()]
    out = t.train_step((x, y), lambda o, yy: CE(o, yy) * float("inf"), "cuda")
    assert out["skipped"] and out["scale"] == 2.0**15
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_cache_is_cleared_on_cuda():
    model = _model()
    t = make_trainer(model, dtype="bf16", clear_cache_interval=1)
    x, y = blobs(64, d_in=32)
    t.train_step((x, y), CE, "cuda")
    assert t.get_amp_stats()["cache_clears"] == 1
