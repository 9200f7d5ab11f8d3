"""`btx evaluate` from a checkout: `python scripts/evaluate.py ARGS` is `btx evaluate ARGS` (`btx evaluate --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
