"""Bad inputs raise a clear error naming the argument, and nothing is written."""
import pytest
import torch

from amp_engine import ops
from conftest import backend_params

pytestmark = pytest.mark.parametrize("backend,device", backend_params())


def good(device, n=2):
    grads = [torch.randn(10, device=device), torch.randn(7, device=device)][:n]
    return grads, torch.tensor(0.5, device=device), torch.zeros((), device=device)


def call(which, grads, inv, found, counts=None, backend=None):
    if which == "unscale":
        ops.unscale_and_check_(grads, inv, found, counts, backend=backend)
    else:
        ops.grad_norm_and_check(grads, inv, found, counts, backend=backend)


BOTH = pytest.mark.parametrize("which", ["unscale", "norm"])


@BOTH
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool])
def test_non_float_grads(backend, device, which, dtype):
    grads, inv, found = good(device)
    grads.append(torch.ones(3, device=device).to(dtype))
    before = [g.clone() for g in grads]
    with pytest.raises(TypeError, match=r"grads\[2\].*dtype"):
        call(which, grads, inv, found, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))  # nothing written


@BOTH
def test_sparse_grads(backend, device, which):
    grads, inv, found = good(device)
    grads.append(torch.eye(3, device=device).to_sparse())
    with pytest.raises(ValueError, match=r"grads\[2\].*sparse|grads\[2\].*layout"):
        call(which, grads, inv, found, backend=backend)


@BOTH
def test_mixed_devices(backend, device, which):
    grads, inv, found = good(device)
    grads.append(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        call(which, grads, inv, found, backend=backend)


@BOTH
@pytest.mark.parametrize("bad,exc", [
    (lambda d: torch.zeros((), dtype=torch.float64, device=d), TypeError),
    (lambda d: torch.zeros((), dtype=torch.int32, device=d), TypeError),
    (lambda d: torch.zeros(2, device=d), ValueError),
])
def test_bad_found_inf(backend, device, which, bad, exc):
    grads, inv, _ = good(device)
    with pytest.raises(exc, match="found_inf"):
        call(which, grads, inv, bad(device), backend=backend)


@BOTH
@pytest.mark.parametrize("bad,exc", [
    (lambda d: torch.tensor(0.5, dtype=torch.float64, device=d), TypeError),
    (lambda d: torch.ones(3, device=d), ValueError),
])
def test_bad_inv_scale(backend, device, which, bad, exc):
    grads, _, found = good(device)
    with pytest.raises(exc, match="inv_scale"):
        call(which, grads, bad(device), found, backend=backend)


@BOTH
@pytest.mark.parametrize("bad,exc", [
    (lambda d: torch.zeros(2, dtype=torch.int32, device=d), TypeError),
    (lambda d: torch.zeros(3, dtype=torch.int64, device=d), ValueError),
    (lambda d: torch.zeros(2, 1, dtype=torch.int64, device=d), ValueError),
])
def test_bad_counts(backend, device, which, bad, exc):
    grads, inv, found = good(device)
    with pytest.raises(exc, match="counts"):
        call(which, grads, inv, found, bad(device), backend=backend)


@BOTH
def test_none_in_list(backend, device, which):
    grads, inv, found = good(device)
    grads.append(None)
    with pytest.raises((TypeError, ValueError)):
        call(which, grads, inv, found, backend=backend)
