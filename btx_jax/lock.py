"""An exclusive lock on a directory that dies with its holder: one training run per work directory.

    with hold(workdir, "training"):        # LockError (one line naming the holder's PID and host) if taken
        ... the whole run ...

The lock is an `fcntl.lockf` lock on `<directory>/.lock`, so the kernel (or the NFS lock manager) drops it when
the holding process ends however it ends (SIGKILL, OOM killer, a crashed node's lease).  The file records
`pid host` for the message a second run gets; it is removed on release, so a file that is found unlocked is
the leftover of a holder that died: it is taken over with a warning naming that PID and host.  Directories
the lock had to create are removed on release if they are still empty (a run refused up front leaves none).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from btx_jax.errors import UserError

NAME = ".lock"


class LockError(UserError, RuntimeError):
    """The directory is held by another live process; the message names its PID and host."""


def _holder(fd: int) -> str:
    """'PID <pid> on host <host>' as recorded in the open lock file, or a placeholder when it is empty."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").split()
    return f"PID {text[0]} on host {text[1]}" if len(text) >= 2 else "an unknown process (empty lock file)"


def _open_locked(path: Path, what: str) -> tuple[int, str | None]:
    """(fd of `path` locked by this process, the stale holder it replaces or None)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockError(f"{path.parent}: another {what} is running in this directory ({holder}); wait for it "
                            f"to finish or stop it, or use another directory (lock file {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:                       # else its holder released (removed) it between our open and lock
            return fd, _holder(fd) if os.fstat(fd).st_size else None
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
    path = directory / NAME
    fd, stale = _open_locked(path, what)
    try:
        if stale is not None:
            print(f"[btx] warning: taking over the lock {path} left by {stale}, which is no longer running",
                  flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)            # while still locked: a waiter re-checks the inode and retries
        os.close(fd)
        for p in created:              # innermost first; stops at the first one that is not empty
            try:
                p.rmdir()
            except OSError:
                break
