#!/usr/bin/env python
"""Run the mixed-precision demo from a checkout: the same as `amp-engine demo`,
with the same flags (`--steps`, `--device`, `--dtype`, `--batch-size`, `--output`,
`--seed`, `--no-plots`; `--help` lists them).

    python run_mixed_precision_demo.py --steps 40
"""
import sys

from amp_engine.cli import main


def run(argv=None) -> int:
    return main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
