"""One writer per index folder: a lock file that the kernel releases when its holder dies.

Two builds on one index would both embed everything and interleave their FAISS
files; so every command that writes (build-index, localize, train-localizer) holds
this lock. `flock` is tied to the open file, so a `kill -9` frees it at once and
no stale lock is ever left to clean up.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simsearch.errors import BadInputError, IndexBusyError, NotFoundError
from simsearch.storage import layout



@contextmanager
def writer_lock(index_dir: str | os.PathLike, what: str = "build-index") -> Iterator[None]:
    """Hold the index's write lock for the block, or raise IndexBusyError naming the holder."""
    if not Path(index_dir).is_dir():
        raise NotFoundError(f"{index_dir}: no index here. Build one first: simsearch build-index DATA --index {index_dir}")
    try:
        lock = try_writer_lock(index_dir, what)
    except OSError as e:
        raise BadInputError(f"cannot write to {index_dir} ({e.strerror or e}); {what} needs a writable index folder") from e
    if lock is None:
        raise IndexBusyError(
            f"another simsearch command is writing to {index_dir} ({holder(index_dir)}); "
            "wait for it to finish (or stop it), then run this again")
    try:
        yield
    finally:
        os.close(lock)


def try_writer_lock(index_dir: str | os.PathLike, what: str) -> int | None:
    """The locked file descriptor (close it to release), or None when another process holds it."""
    path = Path(index_dir) / layout.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{what} pid {os.getpid()}\n".encode())
    return fd


def holder(index_dir: str | os.PathLike) -> str:
    """Who holds the lock, as its holder wrote it ("build-index pid 1234")."""
    try:
        return (Path(index_dir) / layout.LOCK).read_text().strip() or "a process"
    except OSError:
        return "a process"
