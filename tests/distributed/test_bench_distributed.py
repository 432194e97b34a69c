"""benchmarks/bench_distributed.py's plumbing at a tiny size (2 gloo ranks): the rows, not the numbers."""
from amp_engine.bench import distributed_bench

from .ranks import requires_gloo

pytestmark = requires_gloo


def test_fsdp2_rows_for_each_recipe():
    rows = distributed_bench.bench_fsdp2(world=2, width=16, depth=1, rounds=2, timeout=120)
    assert [r.impl for r in rows] == list(distributed_bench.IMPL_NAMES.values())
    for r in rows:
        assert r.bench == "FSDP2 clip+step+update (gloo)" and r.case.startswith("2 ranks, ")
        assert r.median_ms > 0 and r.extra["world"] == 2 and r.extra["rounds"] == 2
        assert r.extra["params_per_rank"] == (16 * 16 + 16) // 2
