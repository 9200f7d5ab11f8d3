"""Exclusive locks that die with their holder: one training run per work directory, one build per data store.

    with hold(workdir, "training"):                 # LockError (one line naming the holder's PID and host)
        ... the whole run ...
    with held(Path(f"{store}.lock"), "store build", wait=True):   # says whom it waits for, then waits
        ... build the store ...

A lock is an `fcntl.lockf` record lock on a lock file, so the kernel (or the NFS lock manager) drops it when
the holding process ends however it ends (SIGKILL, the OOM killer, a crashed node's lease), and child processes
never inherit it.  The file records `PID <pid> on host <host>` for the message another process gets; it is
removed on release, so a file that is found unlocked and not empty is the leftover of a holder that died: it
is taken over with a warning naming that holder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from btx_jax.errors import UserError

NAME = ".lock"


class LockError(UserError, RuntimeError):
    """The lock is held by another live process; the message names its PID and host."""


def _holder(fd: int) -> str:
    """'PID <pid> on host <host>' as recorded in the open lock file, or a placeholder when it is empty."""
    return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process (empty lock file)"


def _open_locked(path: Path, what: str, wait: bool) -> tuple[int, str | None]:
    """(fd of `path` locked by this process, the stale holder it replaces or None)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise LockError(f"{path.parent}: another {what} is running in this directory ({holder}); wait for "
                                f"it to finish or stop it, or use another directory (lock file {path})") from None
            print(f"[btx] waiting for {path}: the {what} is running in {holder}", file=sys.stderr, flush=True)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:                       # else its holder released (removed) it between our open and lock
            return fd, _holder(fd) if os.fstat(fd).st_size else None
        os.close(fd)


@contextlib.contextmanager
def held(path: str | Path, what: str = "run", *, wait: bool = False) -> Iterator[Path]:
    """Hold the lock file `path` exclusively inside the block.  Held elsewhere: LockError, or with `wait` one
    line naming the holder and then block until it is released."""
    path = Path(path)
    fd, stale = _open_locked(path, what, wait)
    try:
        if stale is not None:
            print(f"[btx] warning: taking over the lock {path} left by {stale}, which is no longer running",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)            # while still locked: a waiter re-checks the inode and retries
        os.close(fd)


@contextlib.contextmanager
def hold(directory: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold `<directory>/.lock` exclusively inside the block; LockError if taken.  A `directory` this creates is
    removed again on release when nothing else was written into it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LockError(f"{directory}: not a directory (a file is in the way); choose another path")
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with held(directory / NAME, what) as path:
            yield path
    finally:
        for p in created:              # innermost first; stops at the first one that is not empty
            try:
                p.rmdir()
            except OSError:
                break
