"""grad_norm_and_check: read-only norm + inf check, every backend against the reference."""
import pytest
import torch

from amp_engine import ops
from amp_engine.ops.reference import scaling as reference
from conftest import backend_params

from .cases import torch_grad_norm_and_check
from .cases import BAD_VALUES, DTYPES, SIZES, assert_bitwise, clone_all, flags, mixed_list, scaled_grad

pytestmark = pytest.mark.parametrize("backend,device", backend_params())
RTOL = 2e-6  # fp32 accumulation order differs between backends; the reference sums in fp64


def run_both(grads, inv, backend, device, found=0.0):
    before = clone_all(grads)
    f_mine, c_mine = flags(device, len(grads), found)
    f_ref, c_ref = flags(device, len(grads), found)
    inv_t = torch.tensor(inv, dtype=torch.float32, device=device)
    total, per = ops.grad_norm_and_check(grads, inv_t, f_mine, c_mine, per_tensor=True, backend=backend)
    # the truth: the reference; for the reference itself, torch's kernels (never itself)
    truth = torch_grad_norm_and_check if backend == "reference" else reference.grad_norm_and_check
    r_total, r_per = truth(clone_all(grads), inv_t, f_ref, c_ref, True)
    for a, b in zip(grads, before):
        assert_bitwise(a, b)  # read-only
    assert total.dtype == per.dtype == torch.float32
    assert total.shape == () and per.shape == (len(grads),)
    assert total.device == per.device == torch.device(device) if grads else True
    torch.testing.assert_close(total, r_total, rtol=RTOL, atol=0, equal_nan=True)
    torch.testing.assert_close(per, r_per, rtol=RTOL, atol=0, equal_nan=True)
    assert_bitwise(f_mine, f_ref)
    assert torch.equal(c_mine, c_ref)
    return total, per, f_mine, c_mine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_clean_values(backend, device, dtype, size):
    g = scaled_grad(size, dtype, device)
    total, per, found, counts = run_both([g], 1.0 / 1024, backend, device)
    # independent truth: fp64 norm of the unscaled values
    truth = torch.linalg.vector_norm(g.double() / 1024).float()
    torch.testing.assert_close(total, truth, rtol=RTOL, atol=0)
    assert found.item() == 0.0 and counts.tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_names_the_tensor(backend, device, dtype, bad, where):
    grads = [scaled_grad(5, dtype, device), scaled_grad(4097, dtype, device)]
    grads[1][{"first": 0, "middle": 1000, "last": 4096}[where]] = bad
    total, per, found, counts = run_both(grads, 0.5, backend, device)
    assert not torch.isfinite(total) and torch.isfinite(per[0]) and not torch.isfinite(per[1])
    assert found.item() == 1.0 and counts.tolist() == [0, 1]


def test_overflow_only_after_unscaling(backend, device):
    g = scaled_grad(64, torch.float16, device)
    g[3] = 65000.0
    _, _, found, counts = run_both([g], 2.0, backend, device)
    assert found.item() == 1.0 and counts.tolist() == [1]


def test_same_flags_as_unscale(backend, device):
    grads = mixed_list(40, device, seed=11, bad_every=6)
    inv = torch.tensor(2.0**-10, device=device)
    f1, c1 = flags(device, len(grads))
    f2, c2 = flags(device, len(grads))
    ops.grad_norm_and_check(grads, inv, f1, c1, backend=backend)
    ops.unscale_and_check_(clone_all(grads), inv, f2, c2, backend=backend)
    assert torch.equal(c1, c2) and torch.equal(f1, f2) and c1.sum() > 0


@pytest.mark.parametrize("n_tensors", [1, 9, 300])
def test_mixed_lists(backend, device, n_tensors):
    grads = mixed_list(n_tensors, device, seed=n_tensors, max_numel=600 if n_tensors > 100 else 5000)
    total, per, _, _ = run_both(grads, 2.0**-12, backend, device)
    # the total is the norm of the per-tensor norms, as torch's clip_grad_norm_ computes it
    torch.testing.assert_close(total, torch.linalg.vector_norm(per.double()).float(), rtol=RTOL, atol=0)


def test_matches_torch_clip_recipe(backend, device):
    """Same norm as torch's recipe: unscale_ then clip_grad_norm_'s total norm (fp32 grads)."""
    grads = [scaled_grad(n, torch.float32, device, scale=65536.0) for n in (3000, 17, 999)]
    theirs = clone_all(grads)
    torch._amp_foreach_non_finite_check_and_unscale_(
        theirs, torch.zeros((), device=device), torch.tensor(1 / 65536.0, device=device))
    expect = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(theirs)))
    f, _ = flags(device, 0)
    total = ops.grad_norm_and_check(grads, torch.tensor(1 / 65536.0, device=device), f, backend=backend)
    assert isinstance(total, torch.Tensor) and total.shape == ()
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=0)


def test_per_tensor_false_returns_total_only(backend, device):
    f, _ = flags(device, 0)
    out = ops.grad_norm_and_check([scaled_grad(10, torch.float32, device)],
                                  torch.tensor(1.0, device=device), f, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == ()


def test_empty(backend, device):
    f, c = flags(device, 0)
    total, per = ops.grad_norm_and_check([], torch.tensor(1.0, device=device), f, c,
                                         per_tensor=True, backend=backend)
    assert total.item() == 0.0 and per.shape == (0,) and f.item() == 0.0


def test_non_contiguous_views(backend, device):
    base = scaled_grad(50 * 30, torch.float16, device).reshape(50, 30)
    run_both([base.t(), base[::2, 1::4], base[:, 3]], 0.25, backend, device)


def test_found_inf_never_cleared(backend, device):
    _, _, found, _ = run_both([scaled_grad(33, torch.float32, device)], 1.0, backend, device, found=1.0)
    assert found.item() == 1.0
