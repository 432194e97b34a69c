"""GradScaler per-step cost, torch vs amp_engine (see amp_engine/bench/scaler_bench.py).

    python benchmarks/bench_scaler.py [--device cpu|cuda] [--quick] [--output DIR]
"""
import sys

from amp_engine.bench.scaler_bench import main

if __name__ == "__main__":
    sys.exit(main())
