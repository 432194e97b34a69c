"""check_amp_compatibility: each kind of finding, and no side effects on the model."""
import pytest
import torch
from torch import nn

import amp_engine.trainer.compat as compat
from amp_engine import check_amp_compatibility

from .helpers import mlp

KEYS = {"compatible", "warnings", "issues", "modules", "device", "dtype", "dtype_supported",
        "batchnorm_layers", "custom_functions", "unexpected_dtypes", "trial"}


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class DoubleDecorated(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x):
        return x * 2

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):
        return g * 2


class Block(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(self.lin(x))


class Net(nn.Module):
    def __init__(self, fn=Double):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.block = Block(fn)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.bn(self.inp(x))))


def test_clean_mlp_is_compatible():
    r = check_amp_compatibility(mlp(), dtype="bf16", device="cpu")
    assert set(r) == KEYS
    assert r["compatible"] and r["issues"] == [] and r["warnings"] == []
    assert r["dtype"] == "bfloat16" and r["device"] == "cpu" and r["dtype_supported"]
    assert r["trial"] == {"ran": True, "output_finite": True, "grads_finite": True, "error": None}


def test_batchnorm_and_custom_function_are_named_per_module():
    r = check_amp_compatibility(Net(), dtype=torch.bfloat16)
    assert r["compatible"]  # warnings only
    assert r["batchnorm_layers"] == ["bn"]
    assert any("BatchNorm" in f for f in r["modules"]["bn"])
    # the Function was applied inside `block`'s forward: attributed there, not to `head`
    assert r["custom_functions"] == {"Double": False}
    assert any("Double" in f and "custom_fwd" in f for f in r["modules"]["block"])
    assert "head" not in r["modules"]


def test_custom_fwd_decorated_function_is_fine():
    r = check_amp_compatibility(Net(DoubleDecorated), dtype=torch.bfloat16)
    assert r["custom_functions"] == {"DoubleDecorated": True}
    assert "block" not in r["modules"]


def test_unexpected_parameter_dtypes():
    model = mlp()
    model[2].double()
    model[0].weight.data = model[0].weight.data.half()
    r = check_amp_compatibility(model, dtype="bf16", sample_input=torch.randn(2, 8))
    assert r["unexpected_dtypes"] == {"2.weight": "float64", "2.bias": "float64", "0.weight": "float16"}
    assert any("float64" in w for w in r["modules"]["2"])
    assert any("memory_efficient" in w for w in r["modules"]["0"])


def test_int_buffers_are_not_findings():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # num_batches_tracked is int64
    r = check_amp_compatibility(model, dtype="bf16")
    assert r["unexpected_dtypes"] == {}


class Overflow(nn.Module):
    """Fine in fp32 and bf16; beyond fp16's range (65504) under fp16 autocast."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        nn.init.constant_(self.lin.weight, 1e3)

    def forward(self, x):
        return self.lin(x * 100)


def test_non_finite_trial_is_an_issue():
    r = check_amp_compatibility(Overflow(), dtype="fp16", sample_input=torch.ones(2, 4))
    assert not r["compatible"]
    assert r["trial"]["output_finite"] is False
    assert any("non-finite outputs" in i for i in r["issues"])
    assert check_amp_compatibility(Overflow(), dtype="bf16", sample_input=torch.ones(2, 4))["compatible"]


class HalfHater(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.dtype != torch.float32:
            raise RuntimeError(f"kernel not implemented for {y.dtype}")
        return y


def test_forward_failing_only_under_autocast_is_an_issue():
    r = check_amp_compatibility(HalfHater(), dtype="bf16")
    assert not r["compatible"]
    assert "not implemented for torch.bfloat16" in r["trial"]["error"]
    assert any("fails under autocast" in i for i in r["issues"])


def test_a_wrong_sample_input_is_a_warning_not_an_issue():
    r = check_amp_compatibility(mlp(), dtype="bf16", sample_input=torch.randn(2, 5))
    assert r["compatible"]
    assert any("sample input does not fit" in w for w in r["warnings"])


def test_no_inferable_input_skips_the_trial_with_a_warning():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    r = check_amp_compatibility(NoLayers(), dtype="bf16")
    assert r["compatible"] and not r["trial"]["ran"]
    assert any("trial forward/backward skipped" in w for w in r["warnings"])


@pytest.mark.parametrize("make,shape_ok", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), True),
    (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(32, 2)), True),
])
def test_inferred_inputs_for_conv_and_embedding(make, shape_ok):
    r = check_amp_compatibility(make(), dtype="bf16")
    assert r["trial"]["ran"] is shape_ok and r["compatible"]


def test_unsupported_dtype_on_device_is_an_issue(monkeypatch):
    monkeypatch.setattr(compat, "autocast_support", lambda d, t: (False, "no bf16 on this device"))
    r = check_amp_compatibility(mlp(), dtype="bf16")
    assert not r["compatible"] and not r["dtype_supported"]
    assert r["issues"] == ["no bf16 on this device"]
    assert not r["trial"]["ran"]


def test_autocast_support_asks_torch():
    assert compat.autocast_support("cpu", torch.bfloat16) == (True, None)
    ok, why = compat.autocast_support("meta", torch.float16)
    assert not ok and "meta" in why
    if not torch.cuda.is_available():
        ok, why = compat.autocast_support("cuda", torch.float16)
        assert not ok and "CUDA is not available" in why


def test_parameter_on_another_device_is_an_issue():
    r = check_amp_compatibility(mlp(), dtype="bf16", device="meta")
    assert not r["compatible"]
    assert any("is on cpu" in i for i in r["issues"])


def test_the_check_leaves_no_trace():
    model = Net()
    model.train()
    x = torch.randn(2, 4)
    model(x).sum().backward()  # existing grads must survive untouched
    grads = [p.grad.clone() for p in model.parameters()]
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.num_batches_tracked.clone())
    sample = torch.randn(6, 4)
    rng = torch.get_rng_state()
    check_amp_compatibility(model, dtype="bf16", sample_input=sample)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(stats[0], model.bn.running_mean) and torch.equal(stats[1], model.bn.running_var)
    assert torch.equal(stats[2], model.bn.num_batches_tracked)
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        check_amp_compatibility("resnet")
    with pytest.raises(ValueError, match="dtype"):
        check_amp_compatibility(mlp(), dtype=torch.float32)
