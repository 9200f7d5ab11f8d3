"""SIGTERM / SIGINT during a store build: one line saying what was kept, and exit 128 + the signal (143 / 130).

    with interruptible_build():          # in an entry point, around the store builds
        prepare_config(cfg.data)

`btx_jax.cli.stopping_cleanly` with the store build's line: the handlers raise `BuildInterrupted` (the CLI's
`Stopped`) in the main thread; `build_store` adds the shards it finished (they are kept: a rerun resumes after
them), and the context prints that as one line, without a traceback.
"""
from __future__ import annotations

from btx_jax.command_line import Stopped as BuildInterrupted, build_line, stopping_cleanly

__all__ = ["BuildInterrupted", "interruptible_build"]


def interruptible_build():
    return stopping_cleanly(line=build_line)
