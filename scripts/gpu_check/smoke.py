"""Standalone smoke check for scripts/gpu_check.sh (needs torch and amp_engine only).

The compiled kernels against the reference on the same tensors (CUDA when a GPU is
there, else the CPU ones), the Triton kernels on a GPU, a captured CUDA graph of the
Triton launchers replayed after their table caches overflowed, and two timings on a
GPU. Prints PASS/FAIL lines, TIME lines and `SMOKE OK|FAILED`; exit 1 on a failure.
"""
import sys

import torch

import amp_engine
from amp_engine.ops import available_backends
from amp_engine.ops.reference import scaling as reference

A = torch.ops.amp_engine
CUDA = torch.cuda.is_available()
dev = "cuda" if CUDA else "cpu"
ok = True


def check(name, cond):
    global ok
    ok &= bool(cond)
    print(("PASS " if cond else "FAIL ") + name, flush=True)


def same(a, b):
    return torch.equal(a, b) or (a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-6, atol=0, equal_nan=True)


def grads_for(dtype, big):
    sizes = (0, 1, 5, 123, 4097, 65539, big, 70001)
    grads = [(torch.randn(n, dtype=torch.float64) * 1024).to(dtype).to(dev) for n in sizes]
    grads[4][7], grads[5][65538], grads[6][big - 4099] = float("inf"), float("nan"), float("-inf")
    grads[7][5] = float("nan")
    grads[7] = grads[7][1:]  # misaligned view (storage offset 1): the scalar path
    return grads


def compare_backend(name, mod_unscale, mod_norm, big):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        grads = grads_for(dtype, big)
        inv = torch.tensor(1.0 / 3.0, device=dev)
        for per_tensor in (False, True):
            f1, c1 = torch.zeros((), device=dev), torch.zeros(len(grads), dtype=torch.int64, device=dev)
            f2, c2 = f1.clone(), c1.clone()
            t1, p1 = mod_norm(grads, inv, f1, c1, per_tensor)
            t2, p2 = reference.grad_norm_and_check(grads, inv, f2, c2, per_tensor)
            check(f"{name} norm {dtype} per_tensor={per_tensor}: counts {c1.tolist()}",
                  same(f1, f2) and same(c1, c2) and close(t1, t2) and close(p1, p2))
        mine, ref = [g.clone() for g in grads], [g.clone() for g in grads]
        f1, c1 = torch.zeros((), device=dev), torch.zeros(len(grads), dtype=torch.int64, device=dev)
        f2, c2 = f1.clone(), c1.clone()
        mod_unscale(mine, inv, f1, c1)
        reference.unscale_and_check_(ref, inv, f2, c2)
        check(f"{name} unscale {dtype}: bitwise grads, flag, counts",
              all(same(a, b) for a, b in zip(mine, ref)) and same(f1, f2) and same(c1, c2))


def graph_replay_after_eviction():
    """Capture a Triton unscale; overflow the table cache; replay must still be right."""
    from amp_engine.ops.triton import scaling as tk
    grads = [torch.randn(n, device=dev) for n in (5, 4097, 70001)]
    inv, found = torch.tensor(0.5, device=dev), torch.zeros((), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tk.unscale_and_check_(grads, inv, found)  # warm-up: builds the table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.unscale_and_check_(grads, inv, found)
    for _ in range(tk.TABLES.capacity + 8):  # would evict an unpinned table
        tk.unscale_and_check_([torch.randn(9, device=dev)], inv, torch.zeros((), device=dev))
    torch.cuda.synchronize()
    start = [g.clone() for g in grads]
    graph.replay()
    torch.cuda.synchronize()
    check(f"Triton table pinned across capture ({tk.TABLES.pinned()} pinned): replay after eviction",
          all(torch.equal(g, s * 0.5) for g, s in zip(grads, start)))


print("amp_engine", amp_engine.build_info(), flush=True)
torch.manual_seed(0)
if CUDA:
    check("compiled CUDA kernels registered", amp_engine.build_info()["cuda_kernels"])
    if "cuda" in available_backends("cuda"):
        compare_backend("cuda", A.unscale_and_check_, A.grad_norm_and_check, 320 * 65536 + 4099)
    if "triton" in available_backends("cuda"):
        from amp_engine.ops.triton import scaling as tk
        compare_backend("triton", tk.unscale_and_check_, tk.grad_norm_and_check, 4 * 65536 + 4099)
        graph_replay_after_eviction()
    else:
        check("triton usable on CUDA", False)
else:
    print("no GPU: checking the compiled CPU kernels only", flush=True)
    if amp_engine.build_info()["cpu_kernels"]:
        compare_backend("cpp", A.unscale_and_check_, A.grad_norm_and_check, 70001)
    else:
        check("compiled CPU kernels registered", False)

backend = "cuda" if CUDA and "cuda" in available_backends("cuda") else None
if backend:
    state = [torch.full((), 1024.0, device=dev), torch.zeros((), dtype=torch.int32, device=dev),
             torch.full((), 2, dtype=torch.int32, device=dev)]
    rstate = [t.clone() for t in state]
    good = True
    for step in range(300):
        f = torch.tensor(float((step // 40) % 2 and step % 7 != 0), device=dev)
        args = (f, 2.0, 0.5, 3, 2, 0.125, 2.0**20)
        A.update_scale_(*state, *args)
        reference.update_scale_(*rstate, *args)
        good &= all(torch.equal(a, b) for a, b in zip(state, rstate))
    check(f"update_scale_ 300 steps (final scale {state[0].item()})", good)

    # Two timings (CUDA events, median of 20): 100M fp32 in 400 tensors.
    grads = [torch.randn(250_000, device=dev) for _ in range(400)]
    inv, found = torch.ones((), device=dev), torch.zeros((), device=dev)
    for name, fn in [("ours unscale_and_check_", lambda: A.unscale_and_check_(grads, inv, found, None)),
                     ("torch _amp_foreach_non_finite_check_and_unscale_",
                      lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)),
                     ("ours grad_norm_and_check", lambda: A.grad_norm_and_check(grads, inv, found, None, False)),
                     ("torch _foreach_norm + vector_norm",
                      lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))]:
        times = []
        for _ in range(23):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        ms = sorted(times[3:])[10]
        moved = 400e6 * (2 if "unscale" in name else 1)
        print(f"TIME {name}: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s", flush=True)
print("SMOKE", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
