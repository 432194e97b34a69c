"""adam_step_ / sgd_step_: every backend against the plain-torch reference.

The compiled and Triton kernels do the reference's operations in its order, so
results are compared bitwise (fp64 params: sqrt may differ by an ulp).
"""
import itertools

import pytest
import torch

from amp_engine import ops
from .cases import (KERNELS, LOW, adam_lists, assert_lists_equal, backend_params,
                               clone_lists, scalar, sgd_lists, sizes_for)

pytestmark = pytest.mark.skipif(not KERNELS, reason="no backend but the reference")
KERNEL_PARAMS = backend_params(KERNELS)
MIXED = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_adam(lists, backend, **kw):
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
          "decoupled": True, **kw}
    ops.adam_step_(*lists, backend=backend, **kw)


def compare_adam(lists, backend, device, **kw):
    ours, ref = clone_lists(lists), clone_lists(lists)
    rng = kw.pop("rng_state", None)
    r1, r2 = (rng.clone(), rng.clone()) if rng is not None else (None, None)
    run_adam(ours, backend, rng_state=r1, **kw)
    run_adam(ref, "reference", rng_state=r2, **kw)
    assert_lists_equal(ours, ref, what=f"adam {backend} {kw}")
    if rng is not None:
        assert torch.equal(r1, r2)
    return ours


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("dtype", MIXED)
def test_adam_sizes_dtypes(backend, device, dtype):
    sizes = sizes_for(backend)
    master = dtype in LOW
    lists = adam_lists([dtype] * len(sizes), sizes, device, master=master)
    compare_adam(lists, backend, device, inv_scale=scalar(2.0**-10, device),
                 found_inf=scalar(0.0, device))


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("decoupled,amsgrad,maximize", list(itertools.product([False, True], repeat=3)))
def test_adam_options(backend, device, decoupled, amsgrad, maximize):
    dtypes = MIXED * 3
    sizes = [(7 * i + 3) % 300 for i in range(len(dtypes))]
    lists = adam_lists(dtypes, sizes, device, amsgrad=amsgrad, seed=1)
    compare_adam(lists, backend, device, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                 lr=scalar(3e-3, device), inv_scale=scalar(0.5, device))


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("beta1,weight_decay", [(0.9, 0.0), (0.3, 0.01), (0.0, 0.5)])
def test_adam_hyper_parameters(backend, device, beta1, weight_decay):
    # beta1 = 0.3 takes torch's other lerp branch (weight 0.7 >= 0.5)
    lists = adam_lists([torch.float32, torch.bfloat16], [300, 301], device, seed=2)
    compare_adam(lists, backend, device, beta1=beta1, weight_decay=weight_decay, decoupled=False)


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("master", [False, True])
def test_adam_grads_in_other_dtypes(backend, device, master):
    # each grad is read in its own dtype, whatever the param's
    pdt = [torch.bfloat16, torch.float16] * 4 if master else MIXED * 2
    gdt = [MIXED[i % 4] for i in range(len(pdt))]
    lists = adam_lists(pdt, [257] * len(pdt), device, master=master, grad_dtypes=gdt, seed=3)
    compare_adam(lists, backend, device, inv_scale=scalar(0.25, device))


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
def test_adam_many_tensors(backend, device):
    n = 300
    dtypes = [MIXED[i % 4] for i in range(n)]
    sizes = [(i * 37) % 97 for i in range(n)]
    lists = adam_lists(dtypes, sizes, device, seed=4)
    compare_adam(lists, backend, device, inv_scale=scalar(1.0, device))


def _col_major(device, dtype=torch.float32, rand=False):
    t = torch.rand(40, 6, device=device) if rand else torch.randn(40, 6, device=device)
    return t.to(dtype).t()  # shape (6, 40), dense with strides (1, 6)


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("layout", ["all_permuted", "mixed_layouts"])
def test_adam_non_contiguous(backend, device, layout):
    """Dense permuted tensors are walked in memory order; mixed layouts and non-dense
    views go through contiguous copies that are written back (SR bits follow suit)."""
    p = _col_major(device, torch.bfloat16)
    g = _col_major(device, torch.bfloat16)
    m, v = _col_major(device), _col_major(device, rand=True) * 1e-3
    if layout == "mixed_layouts":
        m = m.contiguous()
    lists = [[p, torch.randn(9, 4, device=device)[::2]], [g, torch.randn(5, 4, device=device)],
             [], [m, torch.zeros(5, 4, device=device)], [v, torch.zeros(5, 4, device=device)], [],
             [scalar(1.0, device), scalar(0.0, device)]]
    rng = torch.tensor([99, 5], device=device)
    assert lists[0][0].stride() == (1, 6)  # clones keep the layout
    compare_adam(lists, backend, device, rng_state=rng, stochastic_rounding=True)


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
def test_adam_param_view_written_back(backend, device):
    """A non-dense param view is updated through a copy and written back in place."""
    bases = [torch.randn(6, 80, device=device).to(torch.bfloat16) for _ in range(2)]
    bases[1].copy_(bases[0])
    g = torch.randn(6, 40, device=device)[:, ::1].to(torch.bfloat16)
    for base, backend_ in zip(bases, (backend, "reference")):
        lists = [[base[:, ::2]], [g.clone()], [], [torch.zeros(6, 40, device=device)],
                 [torch.zeros(6, 40, device=device)], [], [scalar(0.0, device)]]
        run_adam(lists, backend_)
    assert torch.equal(bases[0], bases[1])
    assert not torch.equal(bases[0][:, ::2], g)  # it did change


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("master", [False, True])
def test_adam_stochastic_rounding(backend, device, master):
    sizes = sizes_for(backend)
    dtypes = [torch.bfloat16] * len(sizes) + ([] if master else [torch.float32, torch.float16])
    sizes = sizes + ([] if master else [100, 100])
    lists = adam_lists(dtypes, sizes, device, master=master, seed=5)
    rng = torch.tensor([0x1234_5678_9ABC_DEF0, 41], dtype=torch.int64, device=device)
    compare_adam(lists, backend, device, rng_state=rng, stochastic_rounding=True)


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("found", [1.0, 2.0, float("nan"), float("inf"), -1.0])
def test_adam_skip_changes_nothing(backend, device, found):
    lists = adam_lists(MIXED, [50, 51, 52, 53], device, amsgrad=True)
    lists[1][0][3] = float("inf")
    lists[1][1][0] = float("nan")
    before = clone_lists(lists)
    rng = torch.tensor([7, 3], device=device)
    run_adam(lists, backend, amsgrad=True, found_inf=scalar(found, device), rng_state=rng,
             stochastic_rounding=True)
    assert_lists_equal(lists, before)  # bitwise: params, moments, steps
    assert rng.tolist() == [7, 3]


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
def test_adam_steps_and_counter_advance(backend, device):
    lists = adam_lists([torch.bfloat16, torch.float32], [10, 10], device)
    rng = torch.tensor([7, 3], device=device)
    run_adam(lists, backend, found_inf=scalar(0.0, device), rng_state=rng, stochastic_rounding=True)
    assert [s.item() for s in lists[6]] == [1.0, 2.0]
    assert rng.tolist() == [7, 4]


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("dtype", MIXED)
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.1, False),
                                                          (0.9, 0.0, True)])
def test_sgd(backend, device, dtype, momentum, dampening, nesterov):
    sizes = sizes_for(backend)
    lists = sgd_lists([dtype] * len(sizes), sizes, device, master=dtype in LOW,
                      momentum=momentum != 0)
    lists[4][0].zero_()  # a buffer that has never been used takes the grad
    kw = dict(lr=scalar(0.01, device), momentum=momentum, dampening=dampening, weight_decay=0.01,
              nesterov=nesterov, inv_scale=scalar(0.125, device), found_inf=scalar(0.0, device))
    ours, ref = clone_lists(lists), clone_lists(lists)
    ops.sgd_step_(*ours, backend=backend, **kw)
    ops.sgd_step_(*ref, backend="reference", **kw)
    assert_lists_equal(ours, ref, what="sgd")


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
@pytest.mark.parametrize("maximize,sr", [(True, False), (False, True)])
def test_sgd_maximize_and_rounding(backend, device, maximize, sr):
    lists = sgd_lists([torch.bfloat16, torch.float16, torch.float32], [513, 77, 5], device)
    kw = dict(lr=0.05, momentum=0.5, maximize=maximize, stochastic_rounding=sr)
    ours, ref = clone_lists(lists), clone_lists(lists)
    r1, r2 = torch.tensor([1, 2], device=device), torch.tensor([1, 2], device=device)
    ops.sgd_step_(*ours, backend=backend, rng_state=r1, **kw)
    ops.sgd_step_(*ref, backend="reference", rng_state=r2, **kw)
    assert_lists_equal(ours, ref)
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("backend,device", KERNEL_PARAMS)
def test_sgd_skip_changes_nothing(backend, device):
    lists = sgd_lists(MIXED, [20, 21, 22, 23], device, master=False)
    lists[1][2][1] = float("-inf")
    before = clone_lists(lists)
    ops.sgd_step_(*lists, lr=0.1, momentum=0.9, found_inf=scalar(3.0, device), backend=backend)
    assert_lists_equal(lists, before)
