"""`btx plan` from a checkout: `python scripts/plan.py ARGS` is `btx plan ARGS` (`btx plan --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
