"""Memory measurement: saved-tensor bytes, state bytes, and the trainer's figures."""
import pytest
import torch
from torch import nn

import amp_engine.optim as fused_optim
from amp_engine.trainer.memory import GB, SavedTensorMeter, memory_comparison, state_bytes

from .helpers import CE, blobs, make_trainer, mlp

B, D_IN, H, D_OUT = 4, 8, 16, 3


def _meter(model, x, dtype=None, cache=True):
    with SavedTensorMeter(list(model.parameters())) as meter:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=cache):
            model(x)
    return meter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_bytes_of_a_known_mlp(dtype):
    # Linear(8,16) -> ReLU -> Linear(16,3), input without grad. Autograd saves:
    # the input cast to 16 bit (B*8), the ReLU output (B*16, saved by ReLU and by the
    # second Linear: one storage), the second weight's 16-bit copy (16*3). The first
    # weight is not needed (the input needs no grad).
    model, x = mlp(D_IN, H, D_OUT), torch.randn(B, D_IN)
    amp = _meter(model, x, dtype)
    assert amp.tensors == 3
    assert amp.saved_bytes == 2 * (B * D_IN + B * H + H * D_OUT)
    # at fp32 width: the weight copy counts 0 (fp32 saves the parameter itself)
    assert amp.fp32_bytes == 4 * (B * D_IN + B * H)
    fp32 = _meter(model, x)
    assert fp32.saved_bytes == fp32.fp32_bytes == amp.fp32_bytes  # the real fp32 pass agrees


def test_parameters_and_views_are_not_counted_twice():
    w = nn.Parameter(torch.randn(5, 5))
    x = torch.randn(5, 5, requires_grad=True)
    with SavedTensorMeter([w]) as meter:
        (x * w).sum()  # saves x and w
        (x.t() * x).sum()  # saves a view of x and x: the same storage again
    assert meter.saved_bytes == 25 * 4 and meter.tensors == 1


def test_autocast_weight_cache_is_visible():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            # the 2nd and 3rd use save the weight for the backward (the 1st: its input needs no grad)
            return self.lin(torch.relu(self.lin(torch.relu(self.lin(x)))))

    model, x = Twice(), torch.randn(B, 8)
    cached = _meter(model, x, torch.bfloat16, cache=True).saved_bytes
    uncached = _meter(model, x, torch.bfloat16, cache=False).saved_bytes
    assert uncached - cached == 8 * 8 * 2  # one more bf16 copy of the weight


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def test_state_bytes_fp32_adamw():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    n, n_params = _numel(model), len(list(model.parameters()))
    s = state_bytes(model, opt)
    assert s["params"] == {"actual": 4 * n, "fp32": 4 * n}
    assert s["grads"] == {"actual": 4 * n, "fp32": 4 * n}
    step_bytes = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
    assert s["optimizer_state"]["actual"] == 8 * n + step_bytes == s["optimizer_state"]["fp32"]
    assert step_bytes == 4 * n_params


@pytest.mark.parametrize("dtype,masters", [(torch.bfloat16, False), (torch.float16, True)])
def test_state_bytes_low_precision_weights(dtype, masters):
    model = mlp().to(dtype)
    opt = fused_optim.AdamW(model.parameters(), master_weights=masters, stochastic_rounding=not masters)
    model(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
    opt.step()
    n = _numel(model)
    s = state_bytes(model, opt)
    assert s["params"] == {"actual": 2 * n, "fp32": 4 * n}
    assert s["grads"] == {"actual": 2 * n, "fp32": 4 * n}
    moments = 8 * n + 4 * len(opt.state)  # exp_avg, exp_avg_sq, fp32 step
    master = 4 * n if masters else 0
    assert s["optimizer_state"] == {"actual": moments + master, "fp32": moments}  # fp32 keeps no master


def test_memory_comparison_arithmetic():
    state = {"params": {"actual": 10, "fp32": 20}, "grads": {"actual": 10, "fp32": 20},
             "optimizer_state": {"actual": 40, "fp32": 40}}
    m = memory_comparison(100, 60, state, "saved_tensors")
    assert (m["amp_bytes"], m["fp32_bytes"], m["savings_bytes"]) == (120, 180, 60)
    assert m["savings_gb"] == 60 / GB and m["method"] == "saved_tensors"


def _run(steps=3, **fields):
    x, y = blobs(64)
    fields.setdefault("track_memory_usage", True)
    trainer = make_trainer(dtype="bf16", **fields)
    for i in range(steps):
        trainer.train_step((x[16 * (i % 4):16 * (i % 4) + 16], y[16 * (i % 4):16 * (i % 4) + 16]), CE, "cpu")
    return trainer, trainer.get_amp_stats()


def test_trainer_measures_the_first_amp_step():
    trainer, s = _run()
    assert s["memory_measurements"] == 1
    m = s["last_memory_measurement"]
    assert m["method"] == "saved_tensors" and m["savings_bytes"] > 0
    assert m["activations_amp_bytes"] < m["activations_fp32_bytes"]
    assert s["avg_memory_savings"] == pytest.approx(m["savings_bytes"] / GB)
    assert s["peak_memory_bytes"] == m["amp_bytes"]


def test_memory_interval_and_switch():
    assert _run(steps=5, memory_interval=2)[1]["memory_measurements"] == 3  # steps 1, 3, 5
    off = _run(track_memory_usage=False)[1]
    assert off["memory_measurements"] == 0 and off["avg_memory_savings"] == 0.0
    assert off["peak_memory_bytes"] is None


def test_no_measurement_of_fp32_steps():
    assert _run(enable_amp=False)[1]["memory_measurements"] == 0


def test_cache_enabled_changes_what_is_measured():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.lin(torch.relu(self.lin(torch.relu(self.lin(x))))))
            return self.head(h)

    act = {}
    for cache in (True, False):
        torch.manual_seed(0)
        _, s = _run(steps=1, model=Twice(), cache_enabled=cache)
        act[cache] = s["last_memory_measurement"]["activations_amp_bytes"]
    assert act[False] - act[True] == 8 * 8 * 2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_memory_efficient_uses_measurably_less(dtype):
    amp_bytes = {}
    for efficient in (False, True):
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
        x, y = blobs(32)
        trainer = make_trainer(model, torch.optim.AdamW(model.parameters()), dtype=dtype,
                               track_memory_usage=True, memory_efficient=efficient, fused_optimizer=True)
        trainer.train_step((x, y), CE, "cpu")
        amp_bytes[efficient] = trainer.get_amp_stats()["last_memory_measurement"]["amp_bytes"]
    n = 8 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3
    if dtype == "bf16":  # weights and grads halve, no master: 4 bytes/param less at least
        assert amp_bytes[False] - amp_bytes[True] >= 4 * n
    else:  # weights+grads -4 B, master +4 B; no saved fp16 weight copies for the backward
        assert amp_bytes[False] - amp_bytes[True] >= 2 * (64 * 64 + 64 * 3)
