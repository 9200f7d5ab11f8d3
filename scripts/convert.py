"""`btx convert` from a checkout: `python scripts/convert.py ARGS` is `btx convert ARGS` (`btx convert --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
