"""SIGTERM / SIGINT during a store build: one line saying what was kept, and exit 128 + the signal (143 / 130).

    with interruptible_build():          # in an entry point, around the store builds
        prepare_config(cfg.data)

The handlers raise `BuildInterrupted` in the main thread; `build_store` adds the shards it finished (they are
kept: a rerun resumes after them), and the context prints that as one line, without a traceback. Installed only
from the main thread (signal handlers can be set nowhere else); the previous handlers are restored after.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class BuildInterrupted(BaseException):
    """A stop signal arrived during a store build (a BaseException, like KeyboardInterrupt, so that no handler
    of library errors takes it for a bad input). `kept`: what the interrupted builds left finished."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept = signum, []


def _raise(signum, _frame):
    raise BuildInterrupted(signum)


@contextlib.contextmanager
def interruptible_build() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    except BuildInterrupted as e:
        kept = f"kept {'; '.join(e.kept)}" if e.kept else "no store shard was finished"
        print(f"interrupted by {e} during the data store build: {kept}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
