"""Triton-specific tests of amp_engine.ops.triton.scaling (CPU, TRITON_INTERPRET=1).

The general backend-parametrized op tests live beside this file; here: the
multi-tensor pointer tables (many tensors, chunk boundaries, one launch per
dtype group, table cache), the explicit bf16 round-to-nearest-even, fp64
accumulation of the norm, non-dense views, the scale update, and that every
kernel also compiles for a real GPU target (the interpreter forgives typing
mistakes the compiler does not).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amp_engine.ops.reference import scaling as reference

from amp_engine.ops import dispatch  # noqa: E402

_reason = dispatch.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu")
if _reason is not None:  # e.g. no GPU and no TRITON_INTERPRET=1 (tests/conftest.py sets it with numpy)
    pytest.skip(f"the Triton backend cannot run here: {_reason}", allow_module_level=True)
from amp_engine.ops.triton import scaling as tk  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# on a GPU these are CUDA tests (scripts/gpu_check.sh runs `-m cuda` first)
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16, torch.float64: torch.int64}


def assert_bitwise(a, b):
    """Same bits, NaN payloads aside (torch's own CPU and GPU NaN bits differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    ia = a.contiguous().view(_INT_VIEW[a.dtype])
    ib = b.contiguous().view(_INT_VIEW[b.dtype])
    mask = ~a.contiguous().isnan()
    assert torch.equal(ia[mask], ib[mask]), (a[mask][ia[mask] != ib[mask]][:5], b[mask][ia[mask] != ib[mask]][:5])


def scalars(inv=0.25):
    inv_scale = torch.tensor(inv, dtype=torch.float32, device=DEVICE)
    return inv_scale, torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE)


def run_both(grads, inv=0.25, counts=True):
    """Unscale clones with Triton and with the reference; compare everything."""
    inv_scale, fi_t, fi_r = scalars(inv)
    mine, ref = [g.clone() for g in grads], [g.clone() for g in grads]
    c_t = torch.zeros(len(grads), dtype=torch.int64, device=DEVICE) if counts else None
    c_r = torch.zeros(len(grads), dtype=torch.int64, device=DEVICE) if counts else None
    tk.unscale_and_check_(mine, inv_scale, fi_t, c_t)
    reference.unscale_and_check_(ref, inv_scale, fi_r, c_r)
    for a, b in zip(mine, ref):
        assert_bitwise(a, b)
    assert torch.equal(fi_t, fi_r)
    if counts:
        assert torch.equal(c_t, c_r)
    return mine, fi_t, c_t


def mixed_list(n, max_size, seed=0, poison=True):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size + 1, (n,), generator=gen).tolist()
    grads = []
    for i, m in enumerate(sizes):
        g = torch.randn(m, generator=gen) * 1000
        if poison and m and i % 7 == 3:
            g[torch.randint(0, m, (1,), generator=gen)] = [float("inf"), float("-inf"), float("nan")][i % 3]
        grads.append(g.to(DTYPES[i % 4]).to(DEVICE))
    return grads


# ---------------------------------------------------------------- multi-tensor tables
@pytest.mark.parametrize("n", [1, 7, 300])
def test_many_tensors_mixed_dtypes(n):
    grads = mixed_list(n, 150)
    _, found_inf, counts = run_both(grads, inv=1 / 3)
    assert (found_inf.item() == 1.0) == bool(counts.sum() > 0)
    inv_scale, fi_t, fi_r = scalars(1 / 3)
    c_t, c_r = (torch.zeros(n, dtype=torch.int64, device=DEVICE) for _ in range(2))
    total, per = tk.grad_norm_and_check(grads, inv_scale, fi_t, c_t, True)
    rtotal, rper = reference.grad_norm_and_check(grads, inv_scale, fi_r, c_r, True)
    torch.testing.assert_close(per, rper, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(total, rtotal, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(fi_t, fi_r) and torch.equal(c_t, c_r)


def test_chunk_boundaries(monkeypatch):
    # a small BLOCK makes many chunks per tensor at interpreter-friendly sizes
    monkeypatch.setattr(tk, "BLOCK", 64)
    grads = []
    for m in [63, 64, 65, 128, 129, 1000]:
        for dtype in DTYPES:
            g = torch.randn(m, dtype=dtype, device=DEVICE)
            for k in (63, 64, 127, 128, m - 1):  # both sides of every chunk edge
                if k < m:
                    g[k] = float("inf") if k % 2 else float("nan")
            grads.append(g)
    grads.append(torch.ones(64, device=DEVICE))  # clean tensor between poisoned ones
    _, _, counts = run_both(grads, inv=0.5)
    assert counts[-1].item() == 0
    assert counts[0].item() == 1 and counts[12].item() == 3  # sizes 63 and 128
    inv_scale, fi, _ = scalars(0.5)
    clean = [torch.full((m,), 3.0, dtype=d, device=DEVICE) for m in (64, 65, 1000) for d in DTYPES]
    total, per = tk.grad_norm_and_check(clean, inv_scale, fi, None, True)
    expect = torch.tensor([1.5 * m**0.5 for m in (64, 65, 1000) for _ in DTYPES], device=DEVICE)
    torch.testing.assert_close(per, expect, rtol=1e-6, atol=0)
    assert fi.item() == 0.0


def test_default_block_ragged_sizes():
    grads = [torch.randn(m, dtype=d, device=DEVICE) for m, d in
             zip([tk.BLOCK - 1, tk.BLOCK + 1, 2 * tk.BLOCK + 5, 123], DTYPES)]
    grads[1][tk.BLOCK] = float("inf")
    run_both(grads, inv=2.0**-10)


def _counting(monkeypatch, name):
    launches = []
    kernel = getattr(tk, name)

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tk, name, Counting())
    return launches


def test_one_launch_per_dtype_group(monkeypatch):
    launches = _counting(monkeypatch, "_check_kernel")
    reduces = _counting(monkeypatch, "_reduce_kernel")
    grads = [torch.randn(10 + i, dtype=DTYPES[i % 3], device=DEVICE) for i in range(60)]
    grads.append(torch.empty(0, dtype=torch.float64, device=DEVICE))  # a group with no work
    inv_scale, fi, _ = scalars()
    tk.unscale_and_check_(grads, inv_scale, fi, None)
    assert len(launches) == 3
    tk.grad_norm_and_check(grads, inv_scale, fi, None, False)
    assert len(launches) == 6 and len(reduces) == 1
    tk.unscale_and_check_([], inv_scale, fi, None)
    assert len(launches) == 6


def test_tables_cached_and_reused():
    grads = mixed_list(20, 50, poison=False)
    inv_scale, fi, _ = scalars()
    tk.TABLES.clear()
    built = []
    real = tk._build_plan
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tk, "_build_plan", lambda *a: built.append(a) or real(*a))
        tk.unscale_and_check_(grads, inv_scale, fi, None)
        tk.unscale_and_check_(grads, inv_scale, fi, None)
    assert len(built) == 1 and len(tk.TABLES) == 1
    # same layout, new storage: a fresh table, still right
    run_both([g.clone() for g in grads])


# ---------------------------------------------------------------- numerics
def all_bits(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(DEVICE)


@pytest.mark.parametrize("inv", [1.5, 0.75, 3.0, 2.0**-100, 1e30, 1 / 3])
def test_bf16_rounding_every_pattern(inv):
    # x * 1.5 and x * 0.75 land exactly halfway between bf16 neighbours for every
    # odd mantissa: a truncating cast (the interpreter's) would fail on those
    g = all_bits(torch.bfloat16)
    (mine,), _, _ = run_both([g], inv=inv)
    if inv == 1.5:
        truncated = ((g.float() * inv).view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
        assert not torch.equal(mine.nan_to_num(), truncated.nan_to_num())


@pytest.mark.parametrize("inv", [1.5, 2.0**-20, 1e4])
def test_fp16_every_pattern(inv):
    run_both([all_bits(torch.float16)], inv=inv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_overflow_after_scaling_is_caught(dtype):
    big = torch.finfo(dtype).max
    g = torch.tensor([big / 2, 1.0, -big / 2, 0.0], dtype=dtype, device=DEVICE)
    mine, found_inf, counts = run_both([g], inv=4.0)
    assert found_inf.item() == 1.0 and counts.tolist() == [2]
    assert mine[0].isinf().tolist() == [True, False, True, False]


def test_fp64_grads_use_fp64_inv():
    g = torch.randn(1000, dtype=torch.float64, device=DEVICE)
    (mine,), _, _ = run_both([g], inv=1 / 3)
    inv = torch.tensor(1 / 3, dtype=torch.float32).double()
    assert torch.equal(mine, g * inv.to(DEVICE))


def test_inf_inv_scale_does_not_flag_padding():
    # 0 * inf = NaN: lanes past a tensor's end must not count
    g = torch.zeros(5, device=DEVICE)
    inv_scale, fi, _ = scalars(float("inf"))
    counts = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tk.unscale_and_check_([g], inv_scale, fi, counts)
    assert counts.item() == 5 and fi.item() == 1.0


@pytest.mark.parametrize("value", [1e30, 1e-30])
def test_norm_accumulates_in_fp64(value):
    # fp32 squares would overflow (1e60) or vanish (1e-60); the reference's fp64 do not
    g = torch.full((3000,), value, dtype=torch.float32, device=DEVICE)
    inv_scale, fi, fr = scalars(1.0)
    total, _ = tk.grad_norm_and_check([g], inv_scale, fi, None, False)
    rtotal, _ = reference.grad_norm_and_check([g], inv_scale, fr, None, False)
    assert 0 < total.item() < float("inf")
    torch.testing.assert_close(total, rtotal, rtol=1e-6, atol=0)
    assert fi.item() == 0.0


def test_norm_is_read_only_and_shapes():
    grads = mixed_list(12, 300, poison=True)
    before = [g.clone() for g in grads]
    inv_scale, fi, _ = scalars(0.5)
    total, per = tk.grad_norm_and_check(grads, inv_scale, fi, None, False)
    for a, b in zip(grads, before):
        assert_bitwise(a, b)
    assert total.shape == () and total.dtype == torch.float32 and per.shape == (0,)
    total, per = tk.grad_norm_and_check([], inv_scale, fi, None, True)
    assert total.item() == 0.0 and per.shape == (0,)
    empties = [torch.empty(0, dtype=d, device=DEVICE) for d in DTYPES]
    total, per = tk.grad_norm_and_check(empties, inv_scale, fi, None, True)
    assert total.item() == 0.0 and per.tolist() == [0.0] * 4


def test_empty_and_zero_size():
    inv_scale, fi, _ = scalars()
    tk.unscale_and_check_([], inv_scale, fi, None)
    run_both([torch.empty(0, 3, dtype=d, device=DEVICE) for d in DTYPES])
    assert fi.item() == 0.0


def test_non_dense_views():
    # one base per view: grads never alias, and the views must not either
    bases = [torch.randn(40, 30), torch.randn(40, 30), torch.randn(20, 16, 8).half(),
             torch.randn(20, 16, 8).bfloat16()]
    bases[0][3, 4] = float("nan")
    bases[1][5, 3] = float("inf")  # inside base[:, ::3]
    bases[1][5, 4] = float("inf")  # outside it: must stay untouched and uncounted
    bases = [b.to(DEVICE) for b in bases]

    def views(b):
        return [b[0].t(), b[1][:, ::3], b[2].permute(2, 0, 1), b[3][:, 1:5, ::2].transpose(0, 1)]

    v = views(bases)
    assert tk._is_flat(v[0]) and tk._is_flat(v[2])
    assert not tk._is_flat(v[1]) and not tk._is_flat(v[3])
    mine, ref = [b.clone() for b in bases], [b.clone() for b in bases]
    inv_scale, fi_t, fi_r = scalars(0.125)
    c_t, c_r = (torch.zeros(4, dtype=torch.int64, device=DEVICE) for _ in range(2))
    tk.unscale_and_check_(views(mine), inv_scale, fi_t, c_t)
    reference.unscale_and_check_(views(ref), inv_scale, fi_r, c_r)
    for a, b in zip(mine, ref):  # written through the views, untouched elsewhere
        assert_bitwise(a, b)
    assert torch.equal(c_t, c_r) and c_t.tolist() == [1, 1, 0, 0]
    assert mine[1][0, 1].item() == bases[1][0, 1].item()
    total, per = tk.grad_norm_and_check(views(bases), inv_scale, fi_t, None, True)
    rtotal, rper = reference.grad_norm_and_check(views(bases), inv_scale, fi_r, None, True)
    torch.testing.assert_close(per, rper, rtol=1e-6, atol=0, equal_nan=True)


# ---------------------------------------------------------------- update_scale_
def _state(scale, gt=0, ht=1, found=0.0):
    return (torch.tensor(scale, dtype=torch.float32, device=DEVICE),
            torch.tensor(gt, dtype=torch.int32, device=DEVICE),
            torch.tensor(ht, dtype=torch.int32, device=DEVICE),
            torch.tensor(found, dtype=torch.float32, device=DEVICE))


@pytest.mark.parametrize("kw", [
    dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=3, hysteresis=1),
    dict(growth_factor=3.1, backoff_factor=0.3, growth_interval=1, hysteresis=3,
         min_scale=7.0, max_scale=1000.1),
    dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=2, hysteresis=2,
         min_scale=2.0**-24, max_scale=2.0**100),
])
def test_update_scale_matches_reference_sequence(kw):
    gen = torch.Generator().manual_seed(1)
    flags = (torch.rand(60, generator=gen) < 0.4).float().tolist() + [float("nan"), 2.0, 0.0, 0.0]
    mine, ref = _state(1000.0, ht=kw["hysteresis"]), _state(1000.0, ht=kw["hysteresis"])
    prev = mine[0].clone()
    moves = set()
    for f in flags:
        mine[3].fill_(f)
        ref[3].fill_(f)
        tk.update_scale_(*mine, **kw)
        reference.update_scale_(*ref, **kw)
        for a, b in zip(mine[:3], ref[:3]):
            assert torch.equal(a, b), (f, mine, ref)
        moves.add((mine[0] > prev).item() - (mine[0] < prev).item())
        prev = mine[0].clone()
    assert moves == {-1, 0, 1}  # the sequence really moved the scale both ways


@pytest.mark.parametrize("scale,found,expect", [
    (3e38, 0.0, 3e38),   # growth to inf refused: scale kept
    (float("nan"), 1.0, float("nan")),
    (1e-40, 1.0, 2.0**-24),  # back-off floored at min_scale
])
def test_update_scale_edges(scale, found, expect):
    kw = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=1, hysteresis=1,
              min_scale=2.0**-24, max_scale=float("inf"))
    mine, ref = _state(scale, found=found), _state(scale, found=found)
    tk.update_scale_(*mine, **kw)
    reference.update_scale_(*ref, **kw)
    for a, b in zip(mine[:3], ref[:3]):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
    torch.testing.assert_close(mine[0], torch.tensor(expect, device=DEVICE), equal_nan=True)


def test_update_scale_max_scale_beyond_fp32_is_no_bound():
    # the bounds are fp32 like the scale: 1e300 rounds to inf, i.e. no ceiling
    kw = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=1, hysteresis=1,
              min_scale=2.0**-24)
    mine, ref = _state(2.0**120), _state(2.0**120)
    tk.update_scale_(*mine, max_scale=1e300, **kw)
    reference.update_scale_(*ref, max_scale=float("inf"), **kw)
    assert torch.equal(mine[0], ref[0]) and mine[0].item() == 2.0**121


# ---------------------------------------------------------------- GPU compile check
_COMPILE_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    spec = importlib.util.spec_from_file_location("tk", sys.argv[1])
    tk = importlib.util.module_from_spec(spec); spec.loader.exec_module(tk)
    target = GPUTarget("cuda", 90, 32)
    ptr = {0: "*fp32", 1: "*fp16", 2: "*u16", 3: "*fp64"}
    for kind in range(4):
        for unscale in (True, False):
            sig = dict(meta="*i64", n="i32", n_chunks="i32", chunk_base="i32", inv_scale="*fp32",
                       found_inf="*fp32", counts="*i64", sumsq_ws="*fp64", UNSCALE="constexpr",
                       HAS_COUNTS="constexpr", KIND="constexpr", BLOCK="constexpr")
            cx = dict(UNSCALE=unscale, HAS_COUNTS=True, KIND=kind, BLOCK=tk.BLOCK)
            triton.compile(ASTSource(tk._check_kernel, sig, cx), target=target,
                           options=dict(num_warps=tk._NUM_WARPS))
    sig = dict(meta="*i64", n="i32", n_chunks="i32", sumsq_ws="*fp64", sumsq="*fp64", R="constexpr")
    triton.compile(ASTSource(tk._reduce_kernel, sig, dict(R=tk._REDUCE_BLOCK)), target=target)
    sig = dict(scale="*fp32", growth_tracker="*i32", hysteresis_tracker="*i32", found_inf="*fp32",
               growth_factor="fp64", backoff_factor="fp64", growth_interval="i64",
               hysteresis="i32", min_scale="fp32", max_scale="fp32", inv_scale="*fp32",
               next_found_inf="*fp32", counters="*i64", counts="*i64", ring="*i64",
               n_counts="i64", rows="i64", HAS_INV="constexpr", HAS_NEXT="constexpr",
               HAS_COUNTERS="constexpr", HAS_RING="constexpr", RBLOCK="constexpr")
    for on in (False, True):
        cx = dict(HAS_INV=on, HAS_NEXT=on, HAS_COUNTERS=on, HAS_RING=on, RBLOCK=256)
        triton.compile(ASTSource(tk._update_scale_kernel, sig, cx), target=target)
    print("compiled")
""")


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels for real")
def test_kernels_compile_for_sm90(tmp_path):
    """Without a GPU, the interpreter is all that runs the kernels; compiling them
    (to cubin, no device needed) catches what only the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    src = Path(tk.__file__)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(src)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton cannot compile ahead of time")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
