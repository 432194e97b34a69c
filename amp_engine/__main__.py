"""`python -m amp_engine demo | bench | info` — the same as the `amp-engine` command."""
import sys

from amp_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
