"""Property-based fuzzing (hypothesis) of adam_step_compact_ (fp32 / bf16 / 8-bit block
moments) on every backend against amp_engine.ops.reference.moments8, bitwise.

Random lists mixing moment formats and param dtypes (fp32/fp16/bf16, with or without
fp32 masters), odd shapes (ragged last 8-bit blocks, 0-size), param/grad views
(transposed, strided, misaligned), values from subnormal to huge with planted
inf/-inf/nan/-0.0 in the grads, moments spanning many octaves (8-bit subnormal codes,
flushed blocks), loss scales 2**-24..2**24, random hyper-parameters and skip flags
(a skipped step leaves codes and absmax bitwise unchanged). Small sizes: CI time.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis: pip install 'amp_engine[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from amp_engine.ops import adam_step_compact_, available_backends, dispatch, moments8
from conftest import CUDA_ORDER, device_param

from .fuzz_cases import LOW, SCALES, assert_same, tensor_specs

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
OP = "adam_step_compact_"
BACKENDS = [device_param(b, "cpu") for b in available_backends("cpu", OP) if b != "reference"]
BACKENDS += [device_param(b, "cuda", lambda b, d: dispatch.unavailable_reason(b, d, OP))
             for b in CUDA_ORDER if b != "reference"]
FORMATS = (torch.float32, torch.bfloat16, torch.uint8)
PARAMS = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def cases(draw, max_numel: int):
    n = draw(st.integers(1, 3))
    masters = draw(st.booleans())
    out = []
    for _ in range(n):
        p = draw(tensor_specs(max_numel, dtypes=LOW if masters else PARAMS, regimes=("normal",),
                              specials=False))
        out.append(dict(param=p, grad=draw(tensor_specs(max_numel, shape=p.shape)),
                        m_fmt=draw(st.sampled_from(FORMATS)), v_fmt=draw(st.sampled_from(FORMATS)),
                        # moments over 2**-40 .. 2**0 of magnitude: subnormal codes, flushed blocks
                        m_exp=draw(st.integers(-40, 0)), v_exp=draw(st.integers(-80, 0)),
                        seed=draw(st.integers(0, 2**31 - 1)),
                        step=draw(st.sampled_from([0.0, 1.0, 9.0, 1e4]))))
    return dict(tensors=out, masters=masters,
                hyper=dict(lr=draw(st.floats(0.0, 0.1)), beta1=draw(st.sampled_from([0.0, 0.9])),
                           beta2=draw(st.sampled_from([0.0, 0.99, 0.999])),
                           eps=draw(st.sampled_from([0.0, 1e-8])),
                           weight_decay=draw(st.sampled_from([0.0, 0.01])),
                           decoupled=draw(st.booleans()), maximize=draw(st.booleans())),
                scale=draw(st.one_of(st.none(), SCALES)),
                found=draw(st.sampled_from([None, 0.0, 1.0, float("nan")])),
                sr=draw(st.booleans()), rng=draw(st.tuples(st.integers(0, 2**62), st.integers(0, 2**40))))


def _moment(shape, fmt, exponent, seed, signed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(exponent - 20, exponent + 1,
                                                                   shape, generator=g).float())
    x = x if signed else x * x
    if fmt == torch.uint8:
        codes, absmax = moments8.quantize(x, signed)
        return codes.to(device), absmax.to(device)
    return x.to(fmt).to(device), torch.empty(0, device=device)


def _materialize(case, device):
    lists = [[] for _ in range(8)]
    bases = []
    for t in case["tensors"]:
        p_base, p = t["param"].make(device)
        g_base, g = t["grad"].make(device)
        lists[0].append(p)
        lists[1].append(g)
        if case["masters"]:
            lists[2].append(p.float() + 1e-3)
        m, ma = _moment(p.shape, t["m_fmt"], t["m_exp"], t["seed"], True, device)
        v, va = _moment(p.shape, t["v_fmt"], t["v_exp"], t["seed"] + 1, False, device)
        for k, x in zip((3, 4, 5, 6), (m, v, ma, va)):
            lists[k].append(x)
        lists[7].append(torch.tensor(t["step"], device=device))
        bases += [("param", p_base), ("grad", g_base), ("exp_avg", m), ("exp_avg_sq", v),
                  ("exp_avg_absmax", ma), ("exp_avg_sq_absmax", va), ("step", lists[7][-1])]
    bases += [("master", x) for x in lists[2]]
    rng = torch.tensor(case["rng"], dtype=torch.int64, device=device)
    bases.append(("rng_state", rng))
    kw = dict(case["hyper"], stochastic_rounding=case["sr"], rng_state=rng,
              inv_scale=None if case["scale"] is None else torch.tensor(
                  case["scale"], dtype=torch.float64).reciprocal().float().to(device),
              found_inf=None if case["found"] is None else torch.tensor(case["found"], device=device))
    return lists, kw, bases


def _codes_outside_nan_blocks(codes, absmax):
    """8-bit codes with those of NaN-absmax blocks zeroed: such a block decodes to NaN
    whatever its codes (the sign bit of a NaN moment follows how each backend negates
    a NaN grad for maximize, which nothing defines)."""
    nan = torch.isnan(absmax).repeat_interleave(moments8.BLOCK)[:codes.numel()]
    return torch.where(nan.reshape(codes.shape), torch.zeros_like(codes), codes)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adam_step_compact(backend, device):
    n = settings.default.max_examples

    @settings(max_examples=max(4, n // 2) if backend == "triton" else n)
    @given(case=cases(300 if backend == "triton" else 1500))
    def check(case):
        results = []
        for be in (backend, "reference"):
            lists, kw, bases = _materialize(case, device)
            before = [(k, t.clone()) for k, t in bases]
            adam_step_compact_(*lists, backend=be, **kw)
            if case["found"] not in (None, 0.0):  # skipped: nothing moved, codes included
                for (k, a), (_, b) in zip(before, bases):
                    assert_same(a, b, f"skipped step: {k}")
            results.append(bases)
        got, want = results
        for k, ((name, a), (_, b)) in enumerate(zip(got, want)):
            if a.dtype == torch.uint8:  # codes: bitwise, but in a NaN block any code is NaN
                a, b = _codes_outside_nan_blocks(a, got[k + 2][1]), _codes_outside_nan_blocks(
                    b, want[k + 2][1])
            assert_same(a, b, f"{OP} {name} ({backend} vs reference)")

    check()


def test_the_compiled_kernel_is_fuzzed():
    assert "cpp" not in available_backends("cpu", OP) or any(
        p.values[0] == "cpp" for p in BACKENDS)
