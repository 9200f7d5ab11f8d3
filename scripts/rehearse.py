"""`btx rehearse` from a checkout: `python scripts/rehearse.py ARGS` is `btx rehearse ARGS` (`btx rehearse --help`)."""
import sys

from btx_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["rehearse", *sys.argv[1:]]))
