"""Command-line error handling shared by scripts/: library errors become one stderr line and exit code 2."""
from __future__ import annotations

import re
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


def parse_bytes(text: str) -> int:
    """Bytes of a size flag: '5GB' (10^9, Hugging Face's convention), '141GiB' (2^30), '1000'; ConfigError
    (one line) otherwise."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise ConfigError(f"{text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    return max(1, int(float(m.group(1)) * units[m.group(2).lower()]))
