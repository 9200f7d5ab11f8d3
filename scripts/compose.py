"""`btx compose` from a checkout: `python scripts/compose.py ARGS` is `btx compose ARGS` (`btx compose --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["compose", *sys.argv[1:]]))
