"""unscale_and_check_: every backend against the reference, the reference against torch."""
import pytest
import torch

from amp_engine import ops
from amp_engine.ops.reference import scaling as reference
from conftest import backend_params

from .cases import torch_unscale_and_check_
from .cases import BAD_VALUES, DTYPES, SIZES, assert_bitwise, clone_all, flags, mixed_list, scaled_grad

pytestmark = pytest.mark.parametrize("backend,device", backend_params())


def run_both(grads, inv, backend, device, found=0.0, with_counts=True):
    """Run `backend` and its truth on clones; assert identical results. The truth is
    the reference, and for the reference itself torch's own kernel (never itself)."""
    mine, ref = clone_all(grads), clone_all(grads)
    f_mine, c_mine = flags(device, len(grads), found)
    f_ref, c_ref = flags(device, len(grads), found)
    inv_t = torch.tensor(inv, dtype=torch.float32, device=device)
    ops.unscale_and_check_(mine, inv_t, f_mine, c_mine if with_counts else None, backend=backend)
    truth = torch_unscale_and_check_ if backend == "reference" else reference.unscale_and_check_
    truth(ref, inv_t, f_ref, c_ref if with_counts else None)
    for a, b in zip(mine, ref):
        assert a.dtype == b.dtype
        assert_bitwise(a, b)
    assert_bitwise(f_mine, f_ref)
    if with_counts:
        assert torch.equal(c_mine, c_ref)
    return mine, f_mine, c_mine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_clean_values(backend, device, dtype, size):
    g = scaled_grad(size, dtype, device)
    out, found, counts = run_both([g], 1.0 / 1024, backend, device)
    assert found.item() == 0.0 and counts.tolist() == [0]
    # independent check: the unscaled values are the fp32 product rounded to the dtype
    expect = (g.double() / 1024).to(dtype) if dtype == torch.float64 else (g.float() / 1024).to(dtype)
    assert_bitwise(out[0], expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_placement(backend, device, dtype, bad, where):
    grads = [scaled_grad(4097, dtype, device), scaled_grad(123, dtype, device),
             scaled_grad(5, dtype, device)]
    pos = {"first": 0, "middle": 2048, "last": 4096}[where]
    grads[0][pos] = bad
    _, found, counts = run_both(grads, 0.5, backend, device)
    assert found.item() == 1.0
    assert counts.tolist() == [1, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_only_after_unscaling(backend, device, dtype):
    big = {torch.float16: 60000.0, torch.bfloat16: 3.0e38, torch.float32: 3.0e38,
           torch.float64: 1.7e308}[dtype]
    g = scaled_grad(300, dtype, device)
    g[7] = big  # finite before, inf after * 4 in the grad's dtype
    _, found, counts = run_both([g], 4.0, backend, device)
    assert found.item() == 1.0 and counts.tolist() == [1]


def test_found_inf_never_cleared(backend, device):
    grads = [scaled_grad(100, torch.float32, device)]
    _, found, _ = run_both(grads, 0.25, backend, device, found=1.0)
    assert found.item() == 1.0


def test_counts_accumulate(backend, device):
    grads = mixed_list(12, device, seed=3, bad_every=4)
    found, counts = flags(device, len(grads))
    inv = torch.tensor(1.0, device=device)
    for _ in range(3):
        ops.unscale_and_check_(grads, inv, found, counts, backend=backend)
    once = torch.zeros_like(counts)
    reference.unscale_and_check_(clone_all(grads), inv, torch.zeros_like(found), once)
    assert torch.equal(counts, 3 * once) and once.sum() > 0


@pytest.mark.parametrize("n_tensors", [1, 7, 300])
def test_mixed_lists(backend, device, n_tensors):
    grads = mixed_list(n_tensors, device, seed=n_tensors, max_numel=600 if n_tensors > 100 else 5000,
                       bad_every=5)
    run_both(grads, 2.0**-13, backend, device)
    run_both(grads, 2.0**-13, backend, device, with_counts=False)


def test_empty_list(backend, device):
    found, counts = flags(device, 0)
    ops.unscale_and_check_([], torch.tensor(0.5, device=device), found, counts, backend=backend)
    assert found.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_views(backend, device, dtype):
    base = scaled_grad(64 * 40, dtype, device).reshape(64, 40)
    base[3, 6] = float("nan")  # inside both views
    transposed = base.clone().t()           # dense, permuted strides
    strided = base.clone()[:, ::3]          # not dense: a view into a larger buffer
    parent = strided._base
    mine, _, counts = run_both([transposed, strided], 0.125, backend, device)
    # in-place semantics hold for views: the caller's own tensor is updated
    grads = [transposed.clone(), base.clone()]
    view = grads[1][:, ::3]
    f, c = flags(device, 2)
    ops.unscale_and_check_([grads[0], view], torch.tensor(0.125, device=device), f, c, backend=backend)
    assert_bitwise(view, mine[1])
    assert_bitwise(grads[1][:, 1::3], base[:, 1::3])  # untouched neighbours
    assert parent is not None and counts.tolist() == [1, 1]


def test_matches_torch_kernel(backend, device):
    """On finite values the reference contract equals torch's own unscale kernel."""
    grads = [scaled_grad(n, d, device) for n, d in [(1000, torch.float32), (77, torch.float64),
                                                     (513, torch.float16), (64, torch.bfloat16)]]
    theirs = clone_all(grads)
    found_t = torch.zeros((), device=device)
    inv = torch.tensor(1 / 3.0, device=device)
    for t in theirs:  # torch's kernel wants one dtype per call
        torch._amp_foreach_non_finite_check_and_unscale_([t], found_t, inv)
    mine, found, _ = run_both(grads, 1 / 3.0, backend, device)
    for a, b in zip(mine, theirs):
        assert_bitwise(a, b)
    assert found.item() == found_t.item() == 0.0
