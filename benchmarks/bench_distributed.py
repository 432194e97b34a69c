"""The AMP optimizer step under FSDP2 on 1 and 2 gloo CPU ranks (torch's scalers vs
amp_engine's), or eager vs CUDA graph on a GPU (see amp_engine/bench/distributed_bench.py).

    python benchmarks/bench_distributed.py [--device cpu|cuda] [--quick] [--output DIR]
"""
import sys

from amp_engine.bench.distributed_bench import main

if __name__ == "__main__":
    sys.exit(main())
