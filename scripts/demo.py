"""`btx demo` from a checkout: `python scripts/demo.py ARGS` is `btx demo ARGS` (`btx demo --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
