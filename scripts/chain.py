"""`btx chain` from a checkout: `python scripts/chain.py ARGS` is `btx chain ARGS` (`btx chain --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["chain", *sys.argv[1:]]))
