"""`btx prepare-data` from a checkout: `python scripts/prepare_data.py ARGS` is `btx prepare-data ARGS`."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))
