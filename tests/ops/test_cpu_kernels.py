"""C++ CPU kernels ("cpp" backend), beyond the backend-parametrized op tests.

What only this backend has: the flat walk over a whole tensor list split into
32k-element chunks and per-thread ranges, fp16/bf16 conversions written as
integer bit arithmetic, fp64 lane accumulation of the norm. So: sizes around
chunk and thread boundaries, several thread counts (results must not depend on
them), every fp16/bf16 bit pattern, subnormals, many tiny tensors, and
update_scale_ corner cases against the reference.
"""
import random

import pytest
import torch

from amp_engine import ops
from amp_engine.ops.reference import scaling as reference
from conftest import CPU_BACKENDS

from .cases import DTYPES, assert_bitwise, clone_all, flags, scaled_grad

pytestmark = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ CPU kernels not built")

CHUNK = 32768  # csrc/cpu/grad_chunks.h kChunk
# around chunk boundaries, several chunks, and small ones that share a thread range
BOUNDARY_SIZES = [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 1, 17, 0, 2 * CHUNK, 100_003]
EXTRA = [float("inf"), float("-inf"), float("nan")]


@pytest.fixture
def threads():
    """Set the intra-op thread count for one test, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (-0.0 and subnormals told apart)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that NaN matches any NaN: torch's own NaN payload
    depends on where the element sits (its vector tails widen fp16 NaN to
    0x7FFFFFFF, its full vectors to 0x7FC00000)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def planted(dtype, seed, sizes=BOUNDARY_SIZES):
    """Grads of `sizes` with non-finite values at chunk edges and inside."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        t = (torch.randn(n, generator=gen, dtype=torch.float64) * 1024).to(dtype)
        for k, pos in enumerate((CHUNK - 1, CHUNK, n - 1, n // 2)):
            if 0 <= pos < n and (i + k) % 3 == 0:
                t[pos] = EXTRA[(i + k) % 3]
        out.append(t)
    return out


def unscale_both(grads, inv, backend="cpp"):
    mine, ref = clone_all(grads), clone_all(grads)
    f_m, c_m = flags("cpu", len(grads))
    f_r, c_r = flags("cpu", len(grads))
    inv_t = torch.tensor(inv, dtype=torch.float32)
    ops.unscale_and_check_(mine, inv_t, f_m, c_m, backend=backend)
    reference.unscale_and_check_(ref, inv_t, f_r, c_r)
    return mine, ref, (f_m, c_m), (f_r, c_r)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_chunk_and_thread_boundaries(threads, n_threads, dtype):
    threads(n_threads)
    grads = planted(dtype, seed=n_threads)
    mine, ref, (f_m, c_m), (f_r, c_r) = unscale_both(grads, 2.0**-7)
    for a, b in zip(mine, ref):
        assert same_bits(a, b)
    assert torch.equal(c_m, c_r) and c_r.sum() > 0
    assert f_m.item() == f_r.item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_independent_of_thread_count(threads, dtype):
    grads = planted(dtype, seed=5, sizes=[n for n in BOUNDARY_SIZES if n != 17])
    grads = [g.nan_to_num(0.0, 0.0, 0.0) for g in grads]
    grads[-1][CHUNK + 3] = float("inf")  # one bad value, in a chunk two threads split around
    results = []
    for n in (1, 2, 3, 8):
        threads(n)
        f, c = flags("cpu", len(grads))
        total, per = ops.grad_norm_and_check(grads, torch.tensor(0.25), f, c, per_tensor=True,
                                             backend="cpp")
        results.append((total, per, f, c))
    total0, per0, f0, c0 = results[0]
    for total, per, f, c in results[1:]:  # bitwise: chunk sums are fixed, added in chunk order
        assert torch.equal(bits(per), bits(per0)) and torch.equal(c, c0) and torch.equal(f, f0)
        assert torch.equal(total, total0) or (total.isinf() and total0.isinf())
    assert c0.tolist() == [0] * (len(grads) - 1) + [1] and not per0[-1].isfinite()
    finite = grads[:-1]
    r_total, r_per = reference.grad_norm_and_check(finite, torch.tensor(0.25),
                                                   torch.zeros(()), None, True)
    torch.testing.assert_close(per0[:-1], r_per, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inv", [1.0, 0.5, 3.0, 1 / 3.0, 1.0 + 2.0**-12, 2.0**-24, 2.0**15, 0.0])
def test_every_16bit_pattern(dtype, inv):
    """All 65536 fp16/bf16 values: widening, the fp32 product and RNE narrowing
    (ties, subnormals, overflow to inf) bitwise as torch's own conversions,
    NaN payloads included; the norm's check agrees element by element."""
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    # ragged pieces: every pattern also passes through the scalar tails that
    # follow the 8-wide F16C loops (and counts locate the bad values)
    sizes = [7, 13, 1, 250, 3, 5, 64, 2] * 300
    sizes = sizes[: next(i for i in range(len(sizes)) if sum(sizes[: i + 1]) >= g.numel()) + 1]
    sizes[-1] -= sum(sizes) - g.numel()
    grads = list(g.clone().split(sizes))
    mine, ref, (f_m, c_m), (f_r, c_r) = unscale_both(grads, inv)
    torch_way = (g.float() * torch.tensor(inv, dtype=torch.float32)).to(dtype)
    assert same_bits(torch.cat(mine), torch_way)
    assert torch.equal(c_m, c_r) and f_m.item() == f_r.item() == 1.0
    f_n, c_n = flags("cpu", len(grads))
    total, per = ops.grad_norm_and_check(grads, torch.tensor(inv), f_n, c_n, per_tensor=True,
                                         backend="cpp")
    assert torch.equal(c_n, c_r)
    r_total, r_per = reference.grad_norm_and_check(grads, torch.tensor(inv), torch.zeros(()),
                                                   None, True)
    torch.testing.assert_close(per, r_per, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("inv", [2.0**-20, 2.0**-126, 0.7, 2.0**100])
def test_fp32_subnormals_and_overflow(inv):
    """fp32 grads whose products land in the subnormal range (no flush to zero)
    or overflow; torch's kernel gives the same bits on the finite ones."""
    gen = torch.Generator().manual_seed(1)
    exps = torch.randint(-149, 128, (70_001,), generator=gen).double()
    g = (torch.randn(70_001, generator=gen, dtype=torch.float64) * 2.0**exps).float()
    g[:5] = torch.tensor([1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -0.0])
    mine, ref, (f_m, c_m), (f_r, c_r) = unscale_both([g], inv)
    assert same_bits(mine[0], ref[0]) and torch.equal(c_m, c_r)
    theirs = g.clone()
    torch._amp_foreach_non_finite_check_and_unscale_([theirs], torch.zeros(()), torch.tensor(inv))
    assert same_bits(mine[0], theirs)
    total, per = ops.grad_norm_and_check([g], torch.tensor(inv), *flags("cpu", 1), per_tensor=True,
                                         backend="cpp")
    r_total, _ = reference.grad_norm_and_check([g], torch.tensor(inv), torch.zeros(()), None, True)
    torch.testing.assert_close(total, r_total, rtol=1e-6, atol=0, equal_nan=True)


def test_scaled_fp32_values_do_not_overflow_the_norm():
    """Values near 1e30 (scaled grads) are unscaled before squaring."""
    g = torch.full((5000,), 3.0e30)
    total = ops.grad_norm_and_check([g], torch.tensor(1e-30), torch.zeros(()), backend="cpp")
    torch.testing.assert_close(total, torch.tensor(3.0 * 5000**0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("inv", [float("inf"), float("nan"), 0.0, -1.0])
def test_non_finite_or_odd_inv_scale(inv):
    grads = [scaled_grad(n, d, "cpu") for n, d in zip((40_000, 7, 1000, 3), DTYPES)]
    grads[0][5] = float("inf")
    mine, ref, (f_m, c_m), (f_r, c_r) = unscale_both(grads, inv)
    for a, b in zip(mine, ref):
        assert_bitwise(a, b)
    assert torch.equal(c_m, c_r) and torch.equal(f_m, f_r)


def test_many_tiny_tensors(threads):
    """5,000 tensors of 0-20 elements: the whole list in one flat walk."""
    threads(2)
    rng = random.Random(0)
    grads = [torch.randn(rng.randint(0, 20)).to(rng.choice(DTYPES)) for _ in range(5_000)]
    for i in range(0, 5_000, 47):
        if grads[i].numel():
            grads[i][-1] = EXTRA[i % 3]
    mine, ref, (f_m, c_m), (f_r, c_r) = unscale_both(grads, 2.0**-3)
    assert all(same_bits(a, b) for a, b in zip(mine, ref))
    assert torch.equal(c_m, c_r) and c_m.sum() > 50
    f_n, c_n = flags("cpu", len(grads))
    total, per = ops.grad_norm_and_check(grads, torch.tensor(2.0**-3), f_n, c_n, per_tensor=True,
                                         backend="cpp")
    assert torch.equal(c_n, c_r)
    _, r_per = reference.grad_norm_and_check(grads, torch.tensor(2.0**-3), torch.zeros(()), None,
                                             True)
    torch.testing.assert_close(per, r_per, rtol=1e-6, atol=0, equal_nan=True)


def test_many_bad_values_in_a_split_tensor(threads):
    """Counts from both threads working on one tensor add up exactly."""
    threads(2)
    g = torch.randn(10 * CHUNK + 11)
    idx = torch.randperm(g.numel(), generator=torch.Generator().manual_seed(2))[:5000]
    g[idx] = float("nan")
    f, c = flags("cpu", 1)
    ops.unscale_and_check_([g.clone()], torch.tensor(1.0), f, c, backend="cpp")
    f2, c2 = flags("cpu", 1)
    ops.grad_norm_and_check([g], torch.tensor(1.0), f2, c2, backend="cpp")
    assert c.tolist() == c2.tolist() == [5000] and f.item() == f2.item() == 1.0


def test_norm_accuracy_large():
    """Millions of elements of mixed magnitude: fp64 lanes keep ~1e-7 relative."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3_000_000, generator=gen) * torch.rand(3_000_000, generator=gen) ** 8 * 100
    total = ops.grad_norm_and_check([g, g[::7]], torch.tensor(0.5), torch.zeros(()), backend="cpp")
    truth = (torch.cat([g, g[::7]]).double() * 0.5).norm()
    assert abs(total.double().item() - truth.item()) <= 1e-7 * truth.item()


def update_pair(scale, gt, ht, found, **kw):
    mine = [torch.tensor(scale, dtype=torch.float32), torch.tensor(gt, dtype=torch.int32),
            torch.tensor(ht, dtype=torch.int32)]
    ref = [t.clone() for t in mine]
    f = torch.tensor(found, dtype=torch.float32)
    ops.update_scale_(*mine, f, backend="cpp", **kw)
    reference.update_scale_(*ref, f, kw["growth_factor"], kw["backoff_factor"],
                            kw["growth_interval"], kw.get("hysteresis", 1),
                            kw.get("min_scale", ops.DEFAULT_MIN_SCALE),
                            kw.get("max_scale", ops.DEFAULT_MAX_SCALE))
    return mine, ref


@pytest.mark.parametrize("scale", [1.0, 3.0e38, 2.0**-24, 1e-45, float("inf"), float("nan"), 0.0])
@pytest.mark.parametrize("gt,ht", [(0, 1), (9, 0), (2**31 - 1, -5), (4, 2**31 - 1), (3, -(2**31))])
@pytest.mark.parametrize("found", [0.0, 1.0, float("nan"), -2.0])
def test_update_scale_corners_match_reference(scale, gt, ht, found):
    kw = dict(growth_factor=1.5, backoff_factor=0.3, growth_interval=10, hysteresis=3,
              min_scale=2.0**-20, max_scale=2.0**100)
    mine, ref = update_pair(scale, gt, ht, found, **kw)
    for a, b in zip(mine, ref):
        assert same_bits(a, b), (a, b)


def test_update_scale_random_walk_matches_reference():
    rng = random.Random(7)
    state = (1024.0, 0, 2)
    for _ in range(500):
        kw = dict(growth_factor=rng.choice([2.0, 1.001, 4.0]), backoff_factor=rng.choice([0.5, 0.9]),
                  growth_interval=rng.choice([1, 2, 5]), hysteresis=rng.choice([1, 2, 3]),
                  min_scale=rng.choice([2.0**-24, 1.0]), max_scale=rng.choice([float("inf"), 2.0**20]))
        mine, ref = update_pair(*state, float(rng.random() < 0.3), **kw)
        for a, b in zip(mine, ref):
            assert same_bits(a, b)
        state = (mine[0].item(), mine[1].item(), mine[2].item())


def test_update_scale_hysteresis_beyond_int32():
    s, gt, ht = torch.tensor(8.0), torch.zeros((), dtype=torch.int32), torch.ones((), dtype=torch.int32)
    with pytest.raises(ValueError, match="hysteresis"):
        ops.update_scale_(s, gt, ht, torch.tensor(0.0), growth_factor=2.0, backoff_factor=0.5,
                          growth_interval=3, hysteresis=2**31, backend="cpp")
    assert s.item() == 8.0
