"""Property-based fuzzing (hypothesis) of every op on every backend against the reference.

Random lists of tensors (0-size and odd shapes, fp32/fp16/bf16/fp64, transposed /
strided / misaligned / permuted views), values from subnormal to the dtype's max
with planted inf/-inf/nan/-0.0, loss scales from 2**-24 to 2**24, random
optimizer hyper-parameters and skip flags. Each backend must not crash and must
agree with amp_engine.ops.reference / optim_reference: bitwise (fp64 params: sqrt
may differ by an ulp; norms: summation order), including the memory around a view.

Example counts come from the hypothesis profile (tests/reliability/conftest.py):
"ci" by default, ``HYPOTHESIS_PROFILE=long`` for a long run. The Triton
interpreter gets half of them, on smaller tensors.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis: pip install 'amp_engine[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from amp_engine import ops
from amp_engine.ops import available_backends, optim_backends
from amp_engine.ops import optim_steps
from conftest import CUDA_ORDER, device_param

from .fuzz_cases import DTYPES, LOW, SCALES, TensorSpec, assert_same, spec_lists, tensor_specs

# the Triton interpreter computes in numpy, which warns on the planted inf/nan
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
# the CPU backends usable here, every CUDA one (skipped with the reason where it cannot run)
SCALING = [device_param(b, "cpu") for b in available_backends("cpu") if b != "reference"]
SCALING += [device_param(b, "cuda") for b in CUDA_ORDER if b != "reference"]
OPTIM = [device_param(b, "cpu") for b in optim_backends("cpu") if b != "reference"]
OPTIM += [device_param(b, "cuda", optim_steps.unavailable_reason) for b in CUDA_ORDER
          if b != "reference"]
NORM_RTOL = 2e-6  # the reference sums in fp64; kernels in another order


def examples(backend: str) -> int:
    n = settings.default.max_examples
    return max(4, n // 2) if backend == "triton" else n


def cap(backend: str) -> int:
    """Max elements per tensor (the interpreter runs ~1.4 s per million elements)."""
    return 600 if backend == "triton" else 5000


def _inv(scale: float, device) -> torch.Tensor:
    return torch.tensor(scale, dtype=torch.float64).reciprocal().float().to(device)


def _run_check(op, specs, scale, found, with_counts, backend, device, **kw):
    made = [s.make(device) for s in specs]
    fi = torch.full((), found, dtype=torch.float32, device=device)
    counts = torch.zeros(len(specs), dtype=torch.int64, device=device) if with_counts else None
    out = op([v for _, v in made], _inv(scale, device), fi, counts, backend=backend, **kw)
    return made, fi, counts, out


def _compare_flags(a, b):
    assert_same(a[1], b[1], "found_inf")
    if a[2] is not None:
        assert torch.equal(a[2], b[2]), f"counts {a[2].tolist()} != {b[2].tolist()}"
    for i, ((base_a, _), (base_b, _)) in enumerate(zip(a[0], b[0])):
        assert_same(base_a, base_b, f"grads[{i}] (with the memory around the view)")


@pytest.mark.parametrize("backend,device", SCALING)
def test_unscale_and_check(backend, device):
    @settings(max_examples=examples(backend))
    @given(specs=spec_lists(cap(backend)), scale=SCALES, found=st.sampled_from([0.0, 1.0]),
           with_counts=st.booleans())
    def check(specs, scale, found, with_counts):
        args = (specs, scale, found, with_counts)
        mine = _run_check(ops.unscale_and_check_, *args, backend, device)
        ref = _run_check(ops.unscale_and_check_, *args, "reference", device)
        _compare_flags(mine, ref)

    check()


@pytest.mark.parametrize("backend,device", SCALING)
def test_grad_norm_and_check(backend, device):
    @settings(max_examples=examples(backend))
    @given(specs=spec_lists(cap(backend)), scale=SCALES, found=st.sampled_from([0.0, 1.0]),
           with_counts=st.booleans(), per_tensor=st.booleans())
    def check(specs, scale, found, with_counts, per_tensor):
        args = (specs, scale, found, with_counts)
        mine = _run_check(ops.grad_norm_and_check, *args, backend, device, per_tensor=per_tensor)
        ref = _run_check(ops.grad_norm_and_check, *args, "reference", device,
                         per_tensor=per_tensor)
        _compare_flags(mine, ref)  # read-only: the reference does not write either
        for i, (b, _) in enumerate(mine[0]):
            assert_same(b, specs[i].make(device)[0], f"grads[{i}] written by a read-only op")
        outs = (mine[3], ref[3]) if per_tensor else ((mine[3],), (ref[3],))
        for what, a, b in zip(("total", "per_tensor"), *outs):
            assert a.dtype == torch.float32 and a.device.type == device
            assert_same(a, b, f"{what} norm", rtol=NORM_RTOL)

    check()


@st.composite
def scale_updates(draw):
    min_scale = draw(st.one_of(st.just(2.0**-24), st.floats(2.0**-40, 4.0)))
    max_scale = draw(st.one_of(st.just(float("inf")), st.floats(min_scale, 2.0**40)))
    return dict(
        scale=draw(st.one_of(SCALES, st.sampled_from([3.4e38, 2.0**127, 2.0**-126, 1e-45]))),
        growth_tracker=draw(st.integers(0, 6)), hysteresis_tracker=draw(st.integers(0, 4)),
        found=draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0, float("nan"), float("inf"),
                                             1e-30]), min_size=1, max_size=8)),
        kw=dict(growth_factor=draw(st.floats(1.0, 64.0, exclude_min=True)),
                backoff_factor=draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
                growth_interval=draw(st.integers(1, 5)), hysteresis=draw(st.integers(1, 4)),
                min_scale=min_scale, max_scale=max_scale))


@pytest.mark.parametrize("backend,device", SCALING)
def test_update_scale(backend, device):
    @settings(max_examples=examples(backend))
    @given(case=scale_updates())
    def check(case):
        states = []
        for be in (backend, "reference"):
            st_ = (torch.tensor(case["scale"], dtype=torch.float32, device=device),
                   torch.tensor(case["growth_tracker"], dtype=torch.int32, device=device),
                   torch.tensor(case["hysteresis_tracker"], dtype=torch.int32, device=device))
            history = []
            for f in case["found"]:  # a sequence of updates, compared after each
                fi = torch.tensor(f, dtype=torch.float32, device=device)
                ops.update_scale_(*st_, fi, backend=be, **case["kw"])
                history.append(tuple(t.clone() for t in st_))
            states.append(history)
        for k, (a, b) in enumerate(zip(*states)):
            for name, x, y in zip(("scale", "growth_tracker", "hysteresis_tracker"), a, b):
                assert_same(x, y, f"{name} after update {k}") if x.is_floating_point() \
                    else torch.testing.assert_close(x, y, rtol=0, atol=0)

    check()


# ------------------------------------------------------------------ optimizer steps
@st.composite
def step_cases(draw, max_numel: int, sgd: bool):
    n = draw(st.integers(1, 4))  # empty lists: test_empty_lists
    masters = draw(st.booleans())
    p_dtypes = draw(st.lists(st.sampled_from(LOW if masters else DTYPES), min_size=n, max_size=n))
    params = [draw(tensor_specs(max_numel, dtypes=(dt,), regimes=("normal", "mixed")))
              for dt in p_dtypes]
    tensors = []
    for p in params:
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        same = dict(shape=p.shape, specials=False, regimes=("normal",))
        tensors.append(dict(
            param=p, grad=draw(tensor_specs(max_numel, shape=p.shape)),
            master=draw(tensor_specs(max_numel, dtypes=(torch.float32,), **same)),
            m=draw(tensor_specs(max_numel, dtypes=(acc,), **same)),
            v=draw(tensor_specs(max_numel, dtypes=(acc,), **same)),
            vmax=draw(tensor_specs(max_numel, dtypes=(acc,), **same)),
            step=draw(st.sampled_from([0.0, 1.0, 2.0, 9.0, 1e4]))))
    hyper = dict(lr=draw(st.floats(0.0, 0.1)), weight_decay=draw(st.sampled_from([0.0, 0.01, 0.5])),
                 maximize=draw(st.booleans()))
    if sgd:
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        hyper.update(momentum=momentum, nesterov=nesterov,
                     dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])))
    else:
        hyper.update(beta1=draw(st.sampled_from([0.0, 0.3, 0.9])),
                     beta2=draw(st.sampled_from([0.0, 0.99, 0.999])),
                     eps=draw(st.sampled_from([0.0, 1e-8, 1e-3])),
                     decoupled=draw(st.booleans()), amsgrad=draw(st.booleans()))
    return dict(tensors=tensors, masters=masters, hyper=hyper,
                lr_tensor=draw(st.sampled_from([None, torch.float32, torch.float64])),
                scale=draw(st.one_of(st.none(), SCALES)),
                found=draw(st.sampled_from([None, 0.0, 1.0, 2.0, float("nan")])),
                sr=draw(st.booleans()), rng=draw(st.tuples(st.integers(-2**63, 2**63 - 1),
                                                            st.integers(0, 2**40))))


def _materialize(case, device, sgd: bool):
    """(positional op lists, kwargs, every tensor's base to compare) for one run."""
    bases, lists = [], {k: [] for k in ("p", "g", "master", "m", "v", "vmax", "step")}
    for t in case["tensors"]:
        for key in ("param", "grad", "master", "m", "v", "vmax"):
            spec: TensorSpec = t[key]
            if key == "master" and not case["masters"]:
                continue
            values = spec.values().abs() if key in ("v", "vmax") else None
            base, view = spec.make(device, values=values)
            bases.append((f"{key}", base))
            lists[{"param": "p", "grad": "g"}.get(key, key)].append(view)
        step = torch.tensor(t["step"], dtype=torch.float32, device=device)
        lists["step"].append(step)
        bases.append(("step", step))
    hyper = dict(case["hyper"])
    if case["lr_tensor"] is not None:
        hyper["lr"] = torch.tensor(hyper["lr"], dtype=case["lr_tensor"], device=device)
    rng = torch.tensor(case["rng"], dtype=torch.int64, device=device)
    bases.append(("rng_state", rng))
    kw = dict(hyper, stochastic_rounding=case["sr"], rng_state=rng,
              inv_scale=None if case["scale"] is None else _inv(case["scale"], device),
              found_inf=None if case["found"] is None
              else torch.tensor(case["found"], dtype=torch.float32, device=device))
    if sgd:
        bufs = lists["m"] if case["hyper"]["momentum"] != 0 else []
        args = (lists["p"], lists["g"], lists["master"], bufs, lists["step"])
    else:
        vmax = lists["vmax"] if case["hyper"]["amsgrad"] else []
        args = (lists["p"], lists["g"], lists["master"], lists["m"], lists["v"], vmax, lists["step"])
    return args, kw, bases


def _fuzz_step(op, backend, device, sgd: bool):
    @settings(max_examples=examples(backend))
    @given(case=step_cases(cap(backend) // 4, sgd))
    def check(case):
        results = []
        for be in (backend, "reference"):
            args, kw, bases = _materialize(case, device, sgd)
            op(*args, backend=be, **kw)
            results.append(bases)
        for (name, a), (_, b) in zip(*results):
            # fp64: sqrt may differ by an ulp between backends (the contract)
            assert_same(a, b, f"{op.__name__} {name}", rtol=1e-13 if a.dtype == torch.float64 else 0.0)

    check()


@pytest.mark.parametrize("backend,device", OPTIM)
def test_adam_step(backend, device):
    _fuzz_step(ops.adam_step_, backend, device, sgd=False)


@pytest.mark.parametrize("backend,device", OPTIM)
def test_sgd_step(backend, device):
    _fuzz_step(ops.sgd_step_, backend, device, sgd=True)


@pytest.mark.parametrize("backend,device", OPTIM)
def test_empty_lists(backend, device):
    """No params: nothing to do (a custom op with no tensor argument cannot dispatch):
    the scalar tensors handed in are left exactly as they were."""
    lr = torch.tensor(0.1, device=device)
    inv, found = torch.tensor(0.25, device=device), torch.tensor(0.0, device=device)
    rng = torch.tensor([7, 3], dtype=torch.int64, device=device)
    assert ops.adam_step_([], [], [], [], [], [], [], lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.0, decoupled=True, inv_scale=inv, found_inf=found,
                          rng_state=rng, stochastic_rounding=True, backend=backend) is None
    assert ops.sgd_step_([], [], [], [], [], lr=lr, inv_scale=inv, found_inf=found, rng_state=rng,
                         backend=backend) is None
    assert (lr.item(), inv.item(), found.item(), rng.tolist()) == (
        pytest.approx(0.1), 0.25, 0.0, [7, 3])


def test_every_backend_is_fuzzed():
    """The scaling ops have a kernel besides the reference (the compiled ones when built)."""
    assert SCALING and OPTIM
    assert {p.values[0] for p in OPTIM} >= set(optim_backends("cpu")) - {"reference"}
