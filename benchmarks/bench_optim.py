"""The headline benchmark: the full AMP AdamW step vs torch's recipes
(see amp_engine/bench/optim_bench.py).

    python benchmarks/bench_optim.py [--device cpu|cuda] [--quick] [--output DIR]
"""
import sys

from amp_engine.bench.optim_bench import main

if __name__ == "__main__":
    sys.exit(main())
