"""Handing freed host memory back to the OS between training's stages (opt-in: a process-wide action).

    with returning_freed_memory():       # in an entry point (scripts/train.py), around train()
        train(config, workdir)

glibc keeps freed memory in per-thread arenas that the next stage (compiling, reading the weights, digesting
them, a checkpoint save), run by other threads, does not reuse, so the process's peak would hold every
stage's leftovers.  Inside the block `release_freed_memory()` calls malloc_trim; outside it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

_ENABLED: list[bool] = []


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    _ENABLED.append(True)
    try:
        yield
    finally:
        _ENABLED.pop()


def release_freed_memory() -> None:
    """malloc_trim(0) inside `returning_freed_memory()`; a no-op elsewhere and where the C library has none."""
    if not _ENABLED:
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
