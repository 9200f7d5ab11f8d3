"""python -m btx_jax.cli COMMAND ...: the `btx` command (btx_jax/cli/main.py)."""
import sys

from btx_jax.cli.main import main

sys.exit(main())
