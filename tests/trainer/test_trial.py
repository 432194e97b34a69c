"""Helpers around the user's model and batches: moving, calling, isolating, accuracy."""
import collections

import pytest
import torch
from torch import nn

from amp_engine.trainer.checks import accuracy_counts, sync_metrics
from amp_engine.trainer.trial import (cast_floats, first_tensor, infer_sample_input, isolated_pass, move_to,
                              run_model, split_batch)

META = torch.device("meta")


def test_move_to_nested_batches():
    Pair = collections.namedtuple("Pair", "a b")
    moved = move_to({"x": (torch.ones(2), [torch.zeros(1)]), "p": Pair(torch.ones(1), 3), "s": "text"}, META)
    assert moved["x"][0].device == META and moved["x"][1][0].device == META
    assert isinstance(moved["p"], Pair) and moved["p"].a.device == META and moved["p"].b == 3
    assert moved["s"] == "text"


def test_cast_floats_leaves_integers():
    out = cast_floats({"x": torch.ones(2), "i": torch.arange(2)}, torch.bfloat16)
    assert out["x"].dtype == torch.bfloat16 and out["i"].dtype == torch.int64


def test_run_model_and_first_tensor():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class M(nn.Module):
        def forward(self, a, b=None):
            return Out(a if b is None else a + b)

    x = torch.ones(2)
    assert torch.equal(first_tensor(run_model(M(), x)), x)
    assert torch.equal(first_tensor(run_model(M(), (x, x))), 2 * x)
    assert torch.equal(first_tensor(run_model(M(), {"a": x, "b": x})), 2 * x)
    assert torch.equal(first_tensor(("aux", {"y": x})), x) and first_tensor(("no", 1)) is None


def test_split_batch():
    assert split_batch([1, 2]) == (1, 2)
    with pytest.raises(TypeError, match="of length 3"):
        split_batch((1, 2, 3))
    with pytest.raises(TypeError, match="pair"):
        split_batch({"inputs": 1})


@pytest.mark.parametrize("module,shape,dtype", [
    (nn.Linear(5, 2), (2, 5), torch.float32),
    (nn.Conv1d(3, 4, 3), (2, 3, 8), torch.float32),
    (nn.Conv3d(2, 4, 3).half(), (2, 2, 8, 8, 8), torch.float16),
    (nn.Embedding(7, 4), (2, 8), torch.int64),
    (nn.LSTM(6, 4, batch_first=True), (2, 8, 6), torch.float32),
    (nn.GRU(6, 4), (8, 2, 6), torch.float32),
])
def test_infer_sample_input(module, shape, dtype):
    x = infer_sample_input(nn.Sequential(module), torch.device("cpu"))
    assert tuple(x.shape) == shape and x.dtype == dtype
    assert infer_sample_input(nn.ReLU(), torch.device("cpu")) is None


def test_isolated_pass_restores_everything_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    running = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with isolated_pass(model):
            assert all(p.grad is None for p in model.parameters())
            model(torch.ones(4, 3)).sum().backward()
            raise RuntimeError("boom")
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(running, model[1].running_mean) and torch.equal(rng, torch.get_rng_state())


def test_accuracy_counts():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    correct, total = accuracy_counts(logits, torch.tensor([0, 0, -100]))
    assert (correct.item(), total.item()) == (1, 2)  # ignore_index not counted
    seg = torch.zeros(2, 3, 4, 4)
    seg[:, 1] = 1.0
    assert [t.item() for t in accuracy_counts(seg, torch.ones(2, 4, 4, dtype=torch.long))] == [32, 32]
    assert accuracy_counts(logits, torch.rand(3)) is None  # regression targets
    assert accuracy_counts(logits, torch.tensor([True, False, True])) is None
    assert accuracy_counts(logits, torch.tensor([0, 1])) is None  # shapes do not match
    assert accuracy_counts(logits[:, 0], torch.tensor([0, 1, 1])) is None


def test_sync_metrics_only_what_is_given():
    assert sync_metrics(None, None, None, None, None, None) == {}
    out = sync_metrics(torch.tensor(0.5), torch.tensor([[1.0, 0.0]]), torch.tensor([0]),
                       torch.tensor(2.0), torch.tensor(1.0), None)
    assert out == {"loss": 0.5, "accuracy": 1.0, "grad_norm": 2.0, "found_inf": 1.0}
