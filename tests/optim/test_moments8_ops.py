"""adam_step_compact_ (fp32 / bf16 / 8-bit moments): every backend against the reference."""
from __future__ import annotations

import pytest
import torch

from amp_engine.ops import adam_step_compact_, dispatch, moments8
from amp_engine.ops import available_backends
from conftest import CUDA_ORDER, device_param

OP = "adam_step_compact_"
# Every backend usable on the CPU here ("cpp" when built, "triton" under the
# interpreter), and every CUDA one, generated always (skipped, with the reason, where
# it cannot run): a CPU run reports the CUDA coverage it lacks.
_PAIRS = [(b, "cpu") for b in available_backends("cpu", OP)] + [(b, "cuda") for b in CUDA_ORDER]
BACKENDS = [device_param(b, d, lambda b, d: dispatch.unavailable_reason(b, d, OP))
            for b, d in _PAIRS]
KERNELS = [device_param(b, d, lambda b, d: dispatch.unavailable_reason(b, d, OP))
           for b, d in _PAIRS if (b, d) != ("reference", "cpu")]
SIZES = [0, 5, 255, 256, 257, 4095, 4096, 4097, 70_000]
# (param dtype, fp32 master, stochastic rounding)
PARAMS = [(torch.float32, False, False), (torch.float16, True, False),
          (torch.bfloat16, True, False), (torch.bfloat16, False, True)]
FORMATS = [(torch.uint8, torch.uint8), (torch.bfloat16, torch.bfloat16),
           (torch.float32, torch.uint8), (torch.uint8, torch.bfloat16)]
U8, BF = torch.uint8, torch.bfloat16


def _moment(x: torch.Tensor, dtype, signed):
    if dtype == U8:
        return moments8.quantize(x, signed)
    return x.to(dtype), torch.empty(0)


def make(sizes, p_dtype, master, fmt, device, *, seed=0, scale=64.0):
    """Op lists (params, grads, masters, m, v, m_absmax, v_absmax, steps), mid-training state."""
    gen = torch.Generator().manual_seed(seed)
    out = [[] for _ in range(8)]
    for i, n in enumerate(sizes):
        w = torch.randn(n, generator=gen)
        out[0].append(w.to(p_dtype).to(device))
        out[1].append((torch.randn(n, generator=gen) * scale).to(p_dtype).to(device))
        if master:
            out[2].append((w + torch.randn(n, generator=gen) * 1e-3).to(device))
        m, ma = _moment(torch.randn(n, generator=gen) * 1e-2 * torch.rand(n, generator=gen) ** 3, fmt[0], True)
        v, va = _moment(torch.rand(n, generator=gen) ** 4 * 1e-3, fmt[1], False)
        for k, t in zip((3, 4, 5, 6), (m, v, ma, va)):
            out[k].append(t.to(device))
        out[7].append(torch.tensor(float(i % 3), device=device))
    return out


def clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def bits(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def assert_bitwise(a, b, what=""):
    for k, (xs, ys) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(bits(x.cpu()), bits(y.cpu())), f"{what}: list {k}, tensor {i} differs"


def step(lists, backend, *, found_inf=None, rng=None, sr=False, wd=0.01, decoupled=True,
         maximize=False, inv=0.25):
    device = lists[0][0].device if lists[0] else "cpu"
    adam_step_compact_(*lists, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                       decoupled=decoupled, maximize=maximize,
                       inv_scale=torch.tensor(inv, device=device),
                       found_inf=found_inf, rng_state=rng, stochastic_rounding=sr, backend=backend)


def _sizes(backend, device):
    # the Triton interpreter runs ~1.4 s per million elements: <= 64k per call on a CPU
    return [s for s in SIZES if s <= 65536] if (backend, device) == ("triton", "cpu") else SIZES


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("p_dtype,master,sr", PARAMS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_backend_matches_reference_bitwise(backend, device, p_dtype, master, sr, fmt):
    sizes = _sizes(backend, device)
    ref = make(sizes, p_dtype, master, fmt, device)
    got = clone(ref)
    rng_ref = torch.tensor([123456789, 7], device=device)
    rng_got = rng_ref.clone()
    for k in range(2):  # the second step reads what the first wrote
        step(ref, "reference", rng=rng_ref, sr=sr, decoupled=k == 0, maximize=k == 1)
        step(got, backend, rng=rng_got, sr=sr, decoupled=k == 0, maximize=k == 1)
        assert_bitwise(ref, got, f"{backend} step {k}")
    assert torch.equal(rng_ref, rng_got)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_params_match_reference(backend, device):
    """A transposed param / grad (8-bit codes are contiguous by contract)."""
    base = make([64 * 80], torch.float32, False, (U8, U8), device)
    p, g = base[0][0].reshape(80, 64).t(), base[1][0].reshape(80, 64).t()
    m, ma = moments8.quantize(torch.randn(64, 80) * 1e-2, True)
    v, va = moments8.quantize(torch.rand(64, 80) * 1e-3, False)
    ref = [[p.clone().t().contiguous().t()], [g], [], [m.to(device)], [v.to(device)],
           [ma.to(device)], [va.to(device)], [torch.tensor(1.0, device=device)]]
    got = clone(ref)
    got[0] = [ref[0][0].clone().t().contiguous().t()]
    assert not got[0][0].is_contiguous()
    step(ref, "reference")
    step(got, backend)
    assert_bitwise(ref, got, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("flag", [1.0, 2.0, float("nan")])
def test_skip_leaves_everything_bitwise(backend, device, flag):
    lists = make(_sizes(backend, device)[:8], torch.bfloat16, False, (U8, U8), device)
    for g in lists[1]:
        if g.numel() > 3:
            g[1], g[2] = float("inf"), float("nan")  # what made the scaler skip
    before = clone(lists)
    rng = torch.tensor([5, 9], device=device)
    step(lists, backend, found_inf=torch.tensor(flag, device=device), rng=rng, sr=True)
    assert_bitwise(before, lists, "skipped step")
    assert rng.tolist() == [5, 9]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_quantization_error_against_fp64(backend, device):
    """After one step each 8-bit moment is within half a code step of the exact fp64
    moment: |q - x| <= 2**-(M+1) |x| + (smallest code step)/2 * absmax, + fp32 rounding."""
    lists = make([70_000 if backend == "reference" else 20_000], torch.float32, False, (U8, U8),
                 device, scale=1.0)
    m0 = moments8.dequantize(lists[3][0], lists[5][0], True).double()
    v0 = moments8.dequantize(lists[4][0], lists[6][0], False).double()
    g = lists[1][0].double() * 0.25
    m64, v64 = m0 + 0.1 * (g - m0), v0 * 0.999 + 0.001 * g * g
    step(lists, backend, wd=0.0)
    for q, a, x, signed in ((lists[3][0], lists[5][0], m64, True),
                            (lists[4][0], lists[6][0], v64, False)):
        e_bits, m_bits = moments8.SIGNED_EM if signed else moments8.UNSIGNED_EM
        got = moments8.dequantize(q, a, signed).double()
        amax = a.double().repeat_interleave(moments8.BLOCK)[:x.numel()]
        sub_step = 2.0 ** (2 - (1 << e_bits) - m_bits) / moments8.maxval((e_bits, m_bits))
        bound = 2.0 ** -(m_bits + 1) * x.abs() + (sub_step / 2 + 1e-6) * amax
        assert ((got - x).abs() <= bound).all()
        assert (got - x).abs().max() > 0  # it did quantize


def test_dispatch_picks_the_compiled_kernel_when_built():
    dev = torch.device("cpu")
    built = dispatch.unavailable_reason("cpp", dev, OP) is None
    assert dispatch.select(None, dev, OP) == ("cpp" if built else "reference")
    with pytest.raises(RuntimeError, match="cuda"):
        dispatch.select("cuda", dev, OP)
    with pytest.raises(RuntimeError, match="fast"):
        dispatch.select("fast", dev, OP)


@pytest.mark.parametrize("backend", available_backends("cpu", OP))
def test_argument_errors(backend):
    """The Python checks and the C++ ones (csrc/compact_checks.h) say the same."""
    ok = make([300], torch.float32, False, (U8, U8), "cpu")
    bad = clone(ok)
    bad[5] = []
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        step(bad, backend)
    bad = clone(ok)
    bad[5] = [torch.zeros(1)]
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is uint8"):
        step(bad, backend)
    bad = clone(ok)
    bad[3] = [torch.zeros(300, dtype=torch.float16)]
    with pytest.raises(TypeError, match="exp_avgs"):
        step(bad, backend)
    bad = make([300], torch.float64, False, (torch.float32, torch.float32), "cpu")
    with pytest.raises(TypeError, match="params"):
        step(bad, backend)
    with pytest.raises(ValueError, match="beta1"):
        adam_step_compact_(*ok, lr=1e-3, beta1=1.5, beta2=0.9, eps=1e-8, weight_decay=0.0,
                           decoupled=True, backend=backend)


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_survives_decode_and_requantize(signed):
    """8-bit -> fp32 -> 8-bit (a precision switch and back) returns the same bytes: every
    block's largest code decodes to exactly its absmax, every code to its own nearest."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (40, 256), generator=gen, dtype=torch.uint8)
    codes[:, 0] = 0xFF if not signed else torch.tensor([0x7F, 0xFF])[torch.arange(40) % 2]
    codes[0] = torch.arange(256, dtype=torch.uint8)  # all 256 codes in one block
    if not signed:
        codes[0, 255] = 255
    absmax = torch.rand(40, generator=gen, dtype=torch.float64).float() * 10 ** torch.randint(
        -30, 30, (40,), generator=gen).float()
    x = moments8.dequantize(codes.reshape(-1), absmax, signed)
    again, absmax2 = moments8.quantize(x, signed)
    zero = (x == 0)
    assert torch.equal(absmax2, absmax)
    # +0 and -0 both decode to 0: the signed map's 0x80 comes back as 0x80 (the sign bit)
    assert torch.equal(again[~zero], codes.reshape(-1)[~zero])


@pytest.mark.parametrize("backend,device", [p for p in KERNELS if p.values[0] in ("cpp", "cuda")])
def test_opcheck_compiled_op(backend, device):
    """Schema (what it mutates), fake kernel (torch.compile) and registration of the
    compiled op, on a mix of formats and param dtypes."""
    a = make([300, 4097], torch.bfloat16, False, (U8, BF), device)
    b = make([70], torch.float32, False, (torch.float32, U8), device)
    lists = [x + y for x, y in zip(a, b)]  # no masters; absmax entries where needed
    args = (*lists, torch.tensor(1e-3, device=device), 1e-3, torch.tensor(0.5, device=device),
            torch.zeros((), device=device), torch.tensor([1, 2], device=device), 0.9, 0.999, 1e-8,
            0.01, True, False, True)
    torch.library.opcheck(torch.ops.amp_engine.adam_step_compact_.default, args)
