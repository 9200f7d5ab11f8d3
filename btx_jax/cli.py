"""Command-line error handling shared by scripts/: library errors become one stderr line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ConfigError, FileNotFoundError)


def user_errors() -> tuple[type[BaseException], ...]:
    from btx_jax.data.errors import DataError
    from btx_jax.train.trainer import TrainingError
    return USER_ERRORS + (DataError, TrainingError)


def run_cli(fn: Callable[[], object]) -> object:
    """Run `fn`; on a user error print `error: <message>` (one line) to stderr and exit 2."""
    try:
        return fn()
    except user_errors() as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
