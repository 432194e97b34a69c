"""CUDA kernels only: what the generic op tests do not reach.

Chunk and launch-table boundaries of the multi-tensor apply (64k-element
chunks, 320 blocks and 110 tensors per launch), 1000+ tensors, misaligned views
(scalar path) next to aligned ones (16-byte path), reproducible norms, CUDA
graph capture (no host sync anywhere), and torch's own kernel as a second
oracle. Everything runs the "cuda" backend and the reference on the same CUDA
tensors. Skipped without a GPU.
"""
import os

import pytest
import torch

from amp_engine import ops
from amp_engine.ops import available_backends
from amp_engine.ops.reference import scaling as reference

from .cases import DTYPES, assert_bitwise, clone_all, mixed_list, scaled_grad

HAS_CUDA = torch.cuda.is_available()
BUILT = HAS_CUDA and "cuda" in available_backends("cuda")
REQUIRED = os.environ.get("AMP_ENGINE_REQUIRE_KERNELS") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
needs_kernels = pytest.mark.skipif(not BUILT and not REQUIRED, reason="CUDA kernels not built")

CHUNK = 65536  # csrc/cuda/multi_tensor_apply.cuh: kChunkSize
BLOCKS_PER_LAUNCH = 320  # kMaxBlocksPerLaunch
TENSORS_PER_LAUNCH = 110  # max_tensors_for_depth(1)
DEV = "cuda"


def flags(n, found=0.0, counts_start=0):
    return (torch.full((), found, dtype=torch.float32, device=DEV),
            torch.full((n,), counts_start, dtype=torch.int64, device=DEV))


def check_unscale(grads, inv, found=0.0, counts_start=0):
    """cuda vs reference on clones of `grads`: bitwise grads, flag and counts."""
    mine, ref = clone_all(grads), clone_all(grads)
    f_mine, c_mine = flags(len(grads), found, counts_start)
    f_ref, c_ref = flags(len(grads), found, counts_start)
    inv_t = torch.tensor(inv, dtype=torch.float32, device=DEV)
    ops.unscale_and_check_(mine, inv_t, f_mine, c_mine, backend="cuda")
    reference.unscale_and_check_(ref, inv_t, f_ref, c_ref)
    for i, (a, b) in enumerate(zip(mine, ref)):
        assert a.dtype == b.dtype, i
        assert_bitwise(a, b)
    assert_bitwise(f_mine, f_ref)
    assert torch.equal(c_mine, c_ref), (c_mine - c_ref).nonzero().flatten().tolist()[:10]
    return mine, f_mine, c_mine


def check_norm(grads, inv, found=0.0):
    """cuda vs reference: norms to fp32 rounding of an fp64 sum, flag and counts bitwise."""
    before = clone_all(grads)
    f_mine, c_mine = flags(len(grads), found)
    f_ref, c_ref = flags(len(grads), found)
    inv_t = torch.tensor(inv, dtype=torch.float32, device=DEV)
    total, per = ops.grad_norm_and_check(grads, inv_t, f_mine, c_mine, per_tensor=True, backend="cuda")
    r_total, r_per = reference.grad_norm_and_check(grads, inv_t, f_ref, c_ref, True)
    for a, b in zip(grads, before):
        assert_bitwise(a, b)  # read-only
    assert total.device.type == per.device.type == "cuda"
    assert total.dtype == per.dtype == torch.float32 and per.shape == (len(grads),)
    torch.testing.assert_close(total, r_total, rtol=2e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(per, r_per, rtol=2e-6, atol=0, equal_nan=True)
    assert_bitwise(f_mine, f_ref)
    assert torch.equal(c_mine, c_ref)
    return total, per, f_mine, c_mine


def test_cuda_kernels_built():
    if not BUILT and not REQUIRED:
        pytest.skip("CUDA kernels not built (set AMP_ENGINE_REQUIRE_KERNELS=1 to require them)")
    assert BUILT, "the library was built without CUDA kernels"
    assert "CUDA" in torch._C._dispatch_dump("amp_engine::grad_norm_and_check")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tensor_across_launches(dtype):
    # 320 chunks fill the first launch; the tensor continues (carried into slot 0)
    # in a second launch with a ragged last chunk.
    n = BLOCKS_PER_LAUNCH * CHUNK + 3 * CHUNK + 4099
    g = scaled_grad(n, dtype, DEV)
    bad_at = [0, CHUNK - 1, CHUNK, BLOCKS_PER_LAUNCH * CHUNK - 1, BLOCKS_PER_LAUNCH * CHUNK, n - 1]
    for k, pos in enumerate(bad_at):
        g[pos] = (float("inf"), float("-inf"), float("nan"))[k % 3]
    _, found, counts = check_unscale([g], 2.0**-10)
    assert found.item() == 1.0 and counts.tolist() == [len(bad_at)]
    _, per, _, counts = check_norm([g], 2.0**-10)
    assert counts.tolist() == [len(bad_at)] and not torch.isfinite(per[0])
    # and clean: the norm of the unscaled values
    g[bad_at] = 1.0
    total, _, found, _ = check_norm([g], 2.0**-10)
    assert found.item() == 0.0
    torch.testing.assert_close(total, torch.linalg.vector_norm(g.double() * 2.0**-10).float(),
                               rtol=2e-6, atol=0)


@needs_kernels
def test_table_boundaries_attribute_counts():
    # 109 one-element tensors, then a 5-chunk tensor in the last slot (tensor table
    # full at its last chunk), then two tensors whose chunks straddle the 320-block
    # limit; every tensor gets exactly i % 4 non-finite values.
    sizes = [1] * 109 + [5 * CHUNK, 200 * CHUNK + 17, 150 * CHUNK, 3, 0, CHUNK + 1]
    grads = []
    for i, n in enumerate(sizes):
        g = torch.randn(n, device=DEV)
        k = min(i % 4, n)
        if k:
            g[torch.linspace(0, n - 1, k, device=DEV).long()] = float("nan")
        grads.append(g)
    _, _, counts = check_unscale(grads, 0.25)
    assert counts.tolist() == [min(i % 4, n) for i, n in enumerate(sizes)]
    check_norm(grads, 0.25)


@needs_kernels
def test_thousand_mixed_tensors():
    grads = mixed_list(1200, DEV, seed=3, max_numel=5000, bad_every=7)
    grads[5] = scaled_grad(3 * CHUNK + 1, torch.bfloat16, DEV)
    grads[600] = scaled_grad(2 * CHUNK - 1, torch.float16, DEV)
    _, found, counts = check_unscale(grads, 2.0**-8, counts_start=5)  # counts are added to
    assert found.item() == 1.0 and (counts > 5).sum() > 100
    total, per, _, _ = check_norm(grads, 2.0**-8)
    assert not torch.isfinite(total)
    clean = [g for i, g in enumerate(grads) if i % 7 != 0]
    total, per, found, counts = check_norm(clean, 2.0**-8)
    assert found.item() == 0.0 and counts.sum().item() == 0 and torch.isfinite(total)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views_use_the_scalar_path(dtype, offset):
    # storage offset `offset` elements: the view is contiguous but not 16-byte aligned
    n = 2 * CHUNK + 123
    buf = scaled_grad(n + offset + 8, dtype, DEV)
    view = buf[offset:offset + n]
    view[CHUNK + 5] = float("inf")
    outside = torch.cat([buf[:offset], buf[offset + n:]]).clone()
    inv = torch.tensor(1.0 / 3.0, device=DEV)  # inexact products: rounding is exercised
    ref = view.clone()
    f_mine, c_mine = flags(1)
    f_ref, c_ref = flags(1)
    ops.unscale_and_check_([view], inv, f_mine, c_mine, backend="cuda")
    reference.unscale_and_check_([ref], inv, f_ref, c_ref)
    assert_bitwise(view, ref)
    assert_bitwise(torch.cat([buf[:offset], buf[offset + n:]]), outside)  # nothing outside written
    assert c_mine.tolist() == c_ref.tolist() == [1]
    check_norm([buf[offset:offset + n], scaled_grad(777, dtype, DEV)], 0.125)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_dense_views_written_back(dtype):
    base = scaled_grad(6 * 4097, dtype, DEV).view(6, 4097)
    view = base[:, ::2]  # not dense: unscaled in a contiguous copy, then copied back
    expect = base.clone()
    reference.unscale_and_check_([expect[:, ::2]], torch.tensor(0.5, device=DEV), flags(1)[0])
    check_unscale([view, base.t()], 0.5)
    ops.unscale_and_check_([view], torch.tensor(0.5, device=DEV), flags(1)[0], backend="cuda")
    assert_bitwise(base, expect)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_nearest_even(dtype):
    # every bit pattern of finite halves/bf16 (sampled), odd multipliers: the
    # fp32 product lands between representable values and ties occur.
    bits = torch.arange(-32768, 32768, dtype=torch.int32, device=DEV).to(torch.int16)
    g = bits.view(dtype).clone()
    g = g[torch.isfinite(g)]
    for inv in (1.0 / 3.0, 0.5, 0.75, 1.5, 2.0**-20, 3.0):
        check_unscale([g], inv)
        check_norm([g], inv)


@needs_kernels
def test_norm_is_reproducible():
    grads = mixed_list(500, DEV, seed=9, max_numel=20000)
    grads.append(torch.randn(40 * CHUNK + 7, device=DEV) * 1e3)
    inv = torch.tensor(2.0**-7, device=DEV)
    runs = []
    for _ in range(3):
        f, c = flags(len(grads))
        runs.append(ops.grad_norm_and_check(grads, inv, f, c, per_tensor=True, backend="cuda"))
    for total, per in runs[1:]:
        assert torch.equal(total, runs[0][0]) and torch.equal(per, runs[0][1])


@needs_kernels
def test_empty_inputs_and_flag_never_reset():
    found, counts = flags(0, found=1.0)
    inv = torch.tensor(0.5, device=DEV)
    ops.unscale_and_check_([], inv, found, counts, backend="cuda")
    total, per = ops.grad_norm_and_check([], inv, found, counts, per_tensor=True, backend="cuda")
    assert total.device.type == "cuda" and total.item() == 0.0 and per.shape == (0,)
    grads = [torch.empty(0, device=DEV), torch.ones(10, device=DEV, dtype=torch.bfloat16)]
    _, found, counts = check_unscale(grads, 0.5, found=1.0)
    assert found.item() == 1.0 and counts.tolist() == [0, 0]  # set stays set on clean grads
    total, _, found, _ = check_norm(grads, 0.5, found=1.0)
    assert found.item() == 1.0 and total.item() == pytest.approx(10**0.5 / 2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_agrees_with_torch_kernel(dtype):
    # torch checks only before scaling; with inv_scale < 1 nothing can overflow after,
    # so its results must equal ours bit for bit.
    grads = [scaled_grad(n, dtype, DEV) for n in (1, 5, 123, 4097, 65539, 3 * CHUNK)]
    grads[3][17] = float("nan")
    inv = torch.tensor(2.0**-16 * 3, device=DEV)
    mine, theirs = clone_all(grads), clone_all(grads)
    f_mine, f_theirs = flags(1)[0], flags(1)[0]
    ops.unscale_and_check_(mine, inv, f_mine, backend="cuda")
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, f_theirs, inv)
    for a, b in zip(mine, theirs):
        assert_bitwise(a, b)
    assert_bitwise(f_mine, f_theirs)


@needs_kernels
def test_update_scale_random_walk_matches_reference():
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=3, hysteresis=2,
                  min_scale=2.0**-3, max_scale=2.0**20)
    mine = (torch.full((), 2.0**10, device=DEV), torch.zeros((), dtype=torch.int32, device=DEV),
            torch.full((), 2, dtype=torch.int32, device=DEV))
    ref = tuple(t.clone() for t in mine)
    choices = [0.0, 0.0, 0.0, 1.0, 2.0, float("nan")]  # any non-zero value is an overflow
    for step in range(400):
        # long runs of overflow reach min_scale, long clean runs reach max_scale
        phase = (step // 60) % 2
        f = choices[int(torch.randint(0, len(choices), (1,), generator=gen))] if phase else 0.0
        if phase and step % 5:
            f = 1.0
        found = torch.tensor(f, device=DEV)
        ops.update_scale_(*mine, found, backend="cuda", **kwargs)
        reference.update_scale_(*ref, found, **kwargs)
        for a, b in zip(mine, ref):
            assert_bitwise(a, b)
    # the scale is never pushed to inf by growth
    big = (torch.full((), 3.0e38, device=DEV), torch.full((), 10, dtype=torch.int32, device=DEV),
           torch.ones((), dtype=torch.int32, device=DEV))
    ops.update_scale_(*big, torch.zeros((), device=DEV), growth_factor=2.0, backoff_factor=0.5,
                      growth_interval=1, backend="cuda")
    assert big[0].item() == pytest.approx(3.0e38) and big[1].item() == 0


@needs_kernels
def test_cuda_graph_capture_of_a_whole_check():
    # No host sync and no host-to-device copies: the three ops can be captured and
    # replayed, reading whatever the static inputs hold at replay time.
    grads = mixed_list(300, DEV, seed=5, max_numel=3000) + [torch.randn(3 * CHUNK + 5, device=DEV)]
    inv = torch.tensor(2.0**-4, device=DEV)
    found, counts = flags(len(grads))
    scale = torch.full((), 16.0, device=DEV)
    gt = torch.zeros((), dtype=torch.int32, device=DEV)
    ht = torch.ones((), dtype=torch.int32, device=DEV)
    kwargs = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=1)

    def step():
        total, per = ops.grad_norm_and_check(grads, inv, found, counts, per_tensor=True, backend="cuda")
        ops.unscale_and_check_(grads, inv, found, None, backend="cuda")
        ops.update_scale_(scale, gt, ht, found, backend="cuda", **kwargs)
        return total, per

    originals = clone_all(grads)
    for i in range(0, len(originals), 50):
        if originals[i].numel():
            originals[i][-1] = float("inf")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, per = step()

    # new values in the static inputs, then one replay
    for g, o in zip(grads, originals):
        g.copy_(o)
    found.zero_()
    counts.zero_()
    scale.fill_(16.0)
    gt.zero_()
    ht.fill_(1)
    graph.replay()
    torch.cuda.synchronize()

    e_grads = clone_all(originals)
    e_found, e_counts = flags(len(grads))
    e_scale, e_gt, e_ht = torch.full((), 16.0, device=DEV), torch.zeros_like(gt), torch.ones_like(ht)
    e_total, e_per = reference.grad_norm_and_check(e_grads, inv, e_found, e_counts, True)
    reference.unscale_and_check_(e_grads, inv, e_found, None)
    reference.update_scale_(e_scale, e_gt, e_ht, e_found, **kwargs)
    for a, b in zip(grads, e_grads):
        assert_bitwise(a, b)
    torch.testing.assert_close(per, e_per, rtol=2e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(total, e_total, rtol=2e-6, atol=0, equal_nan=True)
    assert torch.equal(counts, e_counts) and counts.sum().item() > 0
    assert found.item() == 1.0 and scale.item() == e_scale.item() == 8.0


@needs_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    grads = [scaled_grad(70000, torch.float32, "cuda:1"), scaled_grad(5, torch.bfloat16, "cuda:1")]
    grads[0][9] = float("inf")
    inv = torch.tensor(0.5, device="cuda:1")
    found = torch.zeros((), device="cuda:1")
    counts = torch.zeros(2, dtype=torch.int64, device="cuda:1")
    expect = clone_all(grads)
    ops.unscale_and_check_(grads, inv, found, counts, backend="cuda")
    reference.unscale_and_check_(expect, inv, torch.zeros((), device="cuda:1"))
    for a, b in zip(grads, expect):
        assert_bitwise(a, b)
    assert counts.tolist() == [1, 0]
    total = ops.grad_norm_and_check(grads, inv, found, backend="cuda")
    assert total.device == torch.device("cuda:1")
