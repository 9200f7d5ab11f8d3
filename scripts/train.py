"""`btx train` from a checkout: `python scripts/train.py ARGS` is `btx train ARGS` (`btx train --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
