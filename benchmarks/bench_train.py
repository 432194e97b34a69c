"""End-to-end GPT-style training step, torch's AMP recipe vs amp_engine (see
amp_engine/bench/train_bench.py).

    python benchmarks/bench_train.py [--device cpu|cuda] [--quick] [--steps N] [--output DIR]
"""
import sys

from amp_engine.bench.train_bench import main

if __name__ == "__main__":
    sys.exit(main())
