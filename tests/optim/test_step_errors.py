"""Bad inputs to the step ops raise a clear error naming the argument; nothing is written.
Also torch.library.opcheck on the compiled ops (schema, fake kernel, aliasing)."""
import pytest
import torch

from amp_engine import ops
from amp_engine.ops.optim_steps import unavailable_reason

from .cases import ALL, adam_lists, backend_params, clone_lists, scalar

pytestmark = pytest.mark.parametrize("backend,device", backend_params(ALL))


def good(device):
    return adam_lists([torch.float32, torch.bfloat16], [10, 7], device)


def call(lists, backend, **kw):
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
          "decoupled": True, **kw}
    ops.adam_step_(*lists, backend=backend, **kw)


def expect(err, match, lists, backend, **kw):
    before = clone_lists(lists)
    with pytest.raises(err, match=match):
        call(lists, backend, **kw)
    for xs, ys in zip(lists, before):  # nothing written
        assert all(torch.equal(x, y) for x, y in zip(xs, ys) if x.layout == torch.strided
                   and x.device.type != "meta")


def test_complex_param(backend, device):
    lists = good(device)
    lists[0][1] = torch.randn(7, dtype=torch.complex64, device=device)
    expect(TypeError, r"params\[1\].*dtype", lists, backend)


def test_integer_grad(backend, device):
    lists = good(device)
    lists[1][0] = torch.ones(10, dtype=torch.int32, device=device)
    expect(TypeError, r"grads\[0\].*dtype", lists, backend)


def test_sparse_grad(backend, device):
    lists = good(device)
    lists[1][0] = torch.eye(10, device=device)[0].to_sparse()
    expect(ValueError, r"grads.*sparse|grads\[0\].*layout", lists, backend)


def test_shape_mismatch(backend, device):
    lists = good(device)
    lists[3][1] = torch.zeros(8, device=device)
    expect(ValueError, r"exp_avgs\[1\].*shape", lists, backend)


def test_list_length(backend, device):
    lists = good(device)
    lists[4] = lists[4][:1]
    expect(ValueError, r"exp_avg_sqs.*1 tensors", lists, backend)


def test_moment_dtype(backend, device):
    lists = good(device)
    lists[3][1] = lists[3][1].to(torch.bfloat16)
    expect(TypeError, r"exp_avgs\[1\].*dtype", lists, backend)


def test_master_for_fp32_param(backend, device):
    lists = good(device)
    lists[2] = [torch.zeros(10, device=device), torch.zeros(7, device=device)]
    expect(TypeError, r"masters\[0\].*float16/bfloat16", lists, backend)


def test_step_dtype(backend, device):
    lists = good(device)
    lists[6][0] = torch.zeros((), dtype=torch.int64, device=device)
    expect(TypeError, r"steps.*dtype", lists, backend)


@pytest.mark.parametrize("kw,match", [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
    ({"eps": -1e-8}, "eps must be >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
])
def test_bad_hyper_parameters(backend, device, kw, match):
    expect(ValueError, match, good(device), backend, **kw)


def test_found_inf_dtype(backend, device):
    expect(TypeError, "found_inf.*dtype", good(device), backend,
           found_inf=torch.zeros((), dtype=torch.float64, device=device))


def test_inv_scale_shape(backend, device):
    expect(ValueError, "inv_scale.*shape", good(device), backend,
           inv_scale=torch.ones(2, device=device))


def test_stochastic_rounding_needs_rng_state(backend, device):
    expect(ValueError, "rng_state", good(device), backend, stochastic_rounding=True)
    expect(ValueError, "rng_state", good(device), backend, stochastic_rounding=True,
           rng_state=torch.zeros(3, dtype=torch.int64, device=device))


def test_devices_mixed(backend, device):
    lists = good(device)
    lists[1][1] = torch.randn(7, device="meta").to(torch.bfloat16)
    expect(ValueError, r"grads\[1\]|grads.*device", lists, backend)


def test_sgd_nesterov_needs_momentum(backend, device):
    p, g, _, buf, _, _, s = good(device)
    with pytest.raises(ValueError, match="nesterov"):
        ops.sgd_step_(p, g, [], buf, s, lr=0.1, momentum=0.0, nesterov=True, backend=backend)


def test_opcheck(backend, device):
    if backend not in ("cpp", "cuda"):
        pytest.skip("opcheck is for the compiled ops")
    p, g, m, ea, es, mx, s = adam_lists([torch.float32, torch.bfloat16, torch.float16],
                                        [10, 7, 3], device, amsgrad=True)
    args = (p, g, m, ea, es, mx, s, scalar(1e-3, device), 0.0, scalar(0.5, device),
            scalar(0.0, device), torch.tensor([1, 2], device=device), 0.9, 0.999, 1e-8, 0.01,
            True, True, False, True)
    torch.library.opcheck(torch.ops.amp_engine.adam_step_.default, args)
    args = (p, g, [], ea, s, None, 0.1, scalar(0.5, device), scalar(0.0, device), None,
            0.9, 0.0, 0.01, True, False, False)
    torch.library.opcheck(torch.ops.amp_engine.sgd_step_.default, args)


def test_unknown_backend_named(backend, device):
    assert "unknown backend" in unavailable_reason("tpu", device)
    with pytest.raises(RuntimeError, match="tpu"):
        call(good(device), "tpu")
