"""CUDA grad_norm_and_check's cached workspace (csrc/cuda/grad_norm_and_check.cu):
reused across calls of every size without stale sums, per-tensor sums of
multi-chunk tensors formed in the main launch, and never grown during CUDA-graph
capture ("warm up before capture"). Skipped without a GPU."""
import pytest
import torch

from amp_engine import ops
from amp_engine.ops import available_backends, reference

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA or "cuda" not in available_backends("cuda"),
                       reason="needs a CUDA GPU and the compiled CUDA kernels"),
]
CHUNK = 65536  # kChunkSize


def grads(sizes, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, device="cuda", generator=g) for n in sizes]


def norms(gs, backend):
    found = torch.zeros((), device="cuda")
    inv = torch.tensor(0.25, device="cuda")
    total, per = ops.grad_norm_and_check(gs, inv, found, per_tensor=True, backend=backend)
    return total, per


@pytest.mark.parametrize("sizes", [
    [5, 3 * CHUNK + 7, 0, CHUNK, 2 * CHUNK],  # multi-chunk tensors, an empty one
    [17] * 700,                               # more tensors than one launch table
    [CHUNK + 1],                              # smaller again: the grown workspace is reused
])
def test_norms_match_reference_across_calls(sizes):
    gs = grads(sizes, seed=len(sizes))
    t_ref, p_ref = norms(gs, "reference")
    for _ in range(3):  # repeated: sums and counters left at zero in between
        total, per = norms(gs, "cuda")
        torch.testing.assert_close(total, t_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(per, p_ref, rtol=1e-6, atol=0)


def test_repeat_calls_bitwise_identical():
    gs = grads([3 * CHUNK, 10, 5 * CHUNK + 3], seed=1)
    first = norms(gs, "cuda")
    for _ in range(5):
        again = norms(gs, "cuda")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_growing_during_capture_refused_then_capture_after_warmup():
    stream = torch.cuda.Stream()
    small, large = grads([10], seed=2), grads([10] * 4000 + [9 * CHUNK], seed=3)
    found = torch.zeros((), device="cuda")
    inv = torch.tensor(1.0, device="cuda")
    with torch.cuda.stream(stream):
        ops.grad_norm_and_check(small, inv, found, backend="cuda")  # this stream's workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm up before capture"):
        with torch.cuda.graph(graph, stream=stream):
            ops.grad_norm_and_check(large, inv, found, backend="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):  # warm-up with the large list grows it
        ops.grad_norm_and_check(large, inv, found, backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        total = ops.grad_norm_and_check(large, inv, found, backend="cuda")
    for scale in (1.0, 3.0):
        for g in large:
            g.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        expect = ops.grad_norm_and_check(large, inv, torch.zeros((), device="cuda"),
                                         backend="reference")
        torch.testing.assert_close(total, expect, rtol=1e-6, atol=0)
