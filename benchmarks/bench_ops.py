"""unscale+check and norm+check vs torch (see amp_engine/bench/ops_bench.py).

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--output DIR]
"""
import sys

from amp_engine.bench.ops_bench import main

if __name__ == "__main__":
    sys.exit(main())
