"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<run_dir>/.lock``, which the
kernel drops when its holder dies; the file only records the holder's pid."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from cp3er.checkpoint import UnsafePathError

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """Exclusive lock on a run folder, from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._created = False  # the lock file is this holder's (release(discard=True))

    def _open(self) -> int:
        """The lock file's descriptor, never through a symlink (it would be truncated)."""
        flags = os.O_RDWR | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                self._created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
                self._created = False
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UnsafePathError(f"{self.path} is a symlink; a run folder's files must "
                                      "be its own (remove the link)") from None
            raise
        return fd

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder's pid."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(
                    f"run_dir={self.path.parent} is in use by another cp3er-train process "
                    f"(pid {holder}); wait for it to end or stop it, or use another run_dir"
                ) from None
            try:  # the file locked is still the folder's (not one a discarding holder removed)
                current = os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self, discard: bool = False) -> None:
        """Let the folder go; ``discard``: also remove a lock file this holder created."""
        if self._fd is not None:
            if discard and self._created:
                self.path.unlink(missing_ok=True)  # while held: a waiting opener re-checks
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # an abandoned holder (in-process use) lets the folder go
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
