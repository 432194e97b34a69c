"""The compiled ops (LibTorch stable ABI) raise ValueError / TypeError naming the
argument, the value and what is allowed, when called directly through
torch.ops (no Python check in front), and nothing is written."""
import pytest
import torch

from amp_engine import _extension

pytestmark = pytest.mark.skipif(not _extension.has_kernels("CPU"), reason="no compiled CPU kernels")

ops = torch.ops.amp_engine if _extension.LOADED else None


def flags(n=1):
    return torch.tensor(0.5), torch.zeros(()), torch.zeros(n, dtype=torch.int64)


@pytest.mark.parametrize("op", ["unscale_and_check_", "grad_norm_and_check"])
def test_grad_dtype_is_type_error(op):
    inv, found, counts = flags(2)
    grads = [torch.ones(3), torch.ones(3, dtype=torch.int32)]
    args = (grads, inv, found, counts) + ((False,) if op == "grad_norm_and_check" else ())
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype Int; allowed: float32"):
        getattr(ops, op)(*args)
    assert found.item() == 0.0 and counts.tolist() == [0, 0] and grads[0].tolist() == [1, 1, 1]


def test_scalar_shape_is_value_error():
    _, found, _ = flags()
    with pytest.raises(ValueError, match=r"inv_scale has shape \[2\]; expected a one-element"):
        ops.unscale_and_check_([torch.ones(2)], torch.ones(2), found, None)


def test_counts_dtype_is_type_error():
    inv, found, _ = flags()
    with pytest.raises(TypeError, match="counts has dtype Float; expected int64"):
        ops.unscale_and_check_([torch.ones(2)], inv, found, torch.zeros(1))


def test_sparse_grads_are_value_errors():
    inv, found, _ = flags()
    with pytest.raises(ValueError, match="grads contains a sparse tensor"):
        ops.unscale_and_check_([torch.eye(2).to_sparse()], inv, found, None)
    with pytest.raises(ValueError, match="adam_step_: grads contains a sparse tensor"):
        p = torch.zeros(2)
        ops.adam_step_([p], [torch.eye(2)[0].to_sparse()], [], [p.clone()], [p.clone()], [],
                       [torch.zeros(())], None, 0.1, None, None, None, 0.9, 0.999, 1e-8, 0.0,
                       True, False, False, False)


def test_update_scale_values():
    scale, gt, ht = torch.tensor(8.0), torch.zeros((), dtype=torch.int32), torch.ones((), dtype=torch.int32)
    with pytest.raises(ValueError, match="growth_factor must be > 1, got 0.5"):
        ops.update_scale_(scale, gt, ht, torch.zeros(()), 0.5, 0.5, 10, 1, 1e-4, 1e4)
    with pytest.raises(TypeError, match="growth_tracker has dtype Long; expected Int"):
        ops.update_scale_(scale, gt.long(), ht, torch.zeros(()), 2.0, 0.5, 10, 1, 1e-4, 1e4)
    assert scale.item() == 8.0


def _adam(params, steps, **kw):
    args = dict(lr_tensor=None, lr=0.1, inv_scale=None, found_inf=None, rng_state=None,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                amsgrad=False, maximize=False, stochastic_rounding=False)
    args.update(kw)
    grads = [torch.ones_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ops.adam_step_(params, grads, [], m, v, [], steps, *args.values())


def test_step_errors_name_the_index():
    params = [torch.zeros(3), torch.zeros(2)]
    steps = [torch.zeros(()), torch.zeros((), dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"steps\[1\] has dtype Double; expected Float"):
        _adam(params, steps)
    steps = [torch.zeros(()), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"steps\[1\] has shape \[2\]"):
        _adam(params, steps)
    assert all(p.abs().sum() == 0 for p in params)


@pytest.mark.parametrize("kw,match", [
    ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1"),
    ({"eps": -1.0}, "eps must be >= 0, got -1"),
    ({"lr": -0.5}, "lr must be >= 0, got -0.5"),
])
def test_hyper_parameters_are_value_errors(kw, match):
    params = [torch.zeros(3)]
    with pytest.raises(ValueError, match=match):
        _adam(params, [torch.zeros(())], **kw)
    assert params[0].abs().sum() == 0
