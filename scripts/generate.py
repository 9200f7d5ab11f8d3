"""`btx generate` from a checkout: `python scripts/generate.py ARGS` is `btx generate ARGS` (`btx generate --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
