"""Disk faults (no space left, read-only file system, permission denied) as one line naming the path.

    with disk.writing(path, nbytes=state_bytes, cleanup=[tmp_dir]):
        ... write ...

turns an out-of-space or permission error raised while writing (directly, or wrapped by orbax / TensorStore,
which report the OS error in their message) into a `DiskError` such as
`runs/x/checkpoints: no space left on device (writing needs about 1.2 MiB, 0.3 MiB free)`, after removing the
`cleanup` paths.  Anything else propagates unchanged.  `fault_of(exc)` gives the bare reason for handlers
(btx_jax/command_line.py) that see an unwrapped error.

`quiet_background_faults()` (an entry point's process-wide setting) keeps the copies of such a fault that
orbax's writer threads log, with tracebacks, off stderr: the thread that waits for the write reports it once.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

from btx_jax.errors import UserError

REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# How orbax / TensorStore / absl spell the same errors inside their own exception messages.
TEXT = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
        "read-only file system": errno.EROFS, "permission denied": errno.EACCES,
        "operation not permitted": errno.EPERM}


class DiskError(UserError, RuntimeError):
    """A write failed for lack of space or permission; the message is one line naming the path."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fault_of(exc: BaseException) -> tuple[str, str | None] | None:
    """(reason, file name if the error names one) when `exc` (or an exception it wraps) is a disk fault."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in REASONS:
            return REASONS[e.errno], e.filename
        text = str(e).lower()
        for words, code in TEXT.items():
            if words in text:
                return REASONS[code], None
    return None


def human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def message(path: str | Path, reason: str, nbytes: int | None = None) -> str:
    text = f"{path}: {reason}"
    if reason == REASONS[errno.ENOSPC] and nbytes:
        free = free_bytes(path)
        text += f" (writing needs about {human(nbytes)}" + (f", {human(free)} free)" if free is not None else ")")
    fix = "free space" if reason in (REASONS[errno.ENOSPC], REASONS[errno.EDQUOT]) else "fix the permissions"
    return text + f"; earlier results are untouched: {fix} and rerun"


def require(path: str | Path, nbytes: int) -> None:
    """DiskError before writing `nbytes` under `path` when the file system has less free space than that
    (checked up front so that a full disk fails cleanly instead of inside orbax's background threads)."""
    free = free_bytes(path)
    if free is not None and free < nbytes:
        raise DiskError(message(path, REASONS[errno.ENOSPC], nbytes))


@contextlib.contextmanager
def writing(path: str | Path, nbytes: int | None = None, cleanup: Iterable[str | Path] = ()) -> Iterator[None]:
    """Turn a disk fault inside the block into a DiskError naming `path` (after removing `cleanup`)."""
    try:
        yield
    except DiskError:
        raise
    except Exception as e:
        fault = fault_of(e)
        if fault is None:
            raise
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)
        raise DiskError(message(fault[1] or path, fault[0], nbytes)) from None


class _BackgroundFaults(logging.Filter):
    """Drops log records about a disk fault (orbax logs its failed background writes with their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and fault_of(exc)) or fault_of(Exception(record.getMessage())))


def _late_callback(exc: BaseException | None, tb) -> bool:
    """A TensorStore write finishing after orbax closed the event loop that awaited it (orbax closes its loop
    as soon as one write of a save fails; the others' completions then raise in asyncio's closed-loop check
    on TensorStore's threads, which print them through sys.unraisablehook or sys.excepthook)."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).match("asyncio/base_events.py")


def quiet_background_faults(logger: str = "absl") -> None:
    """Keep disk faults that orbax's background threads log (through absl, i.e. the `logger` logger) off
    stderr, with the late callbacks of the writes they abort; the main thread's DiskError says it in one line.
    An entry point's process-wide setting (it wraps sys.unraisablehook and sys.excepthook)."""
    logging.getLogger(logger).addFilter(_BackgroundFaults())
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(u) -> None:
        if not _late_callback(u.exc_value, u.exc_traceback):
            unraisable(u)

    def quiet_excepthook(kind, value, tb) -> None:
        if not _late_callback(value, tb):
            excepthook(kind, value, tb)
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
