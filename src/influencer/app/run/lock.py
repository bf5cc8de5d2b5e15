"""One process at a time in a directory: an exclusive OS lock (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows) on a lock file, released by the operating system when the process
ends, however it ends. Network file systems that do not implement these locks cannot give that
guarantee."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from pathlib import Path

from influencer.errors import InfluencerError

log = logging.getLogger("influencer.store")


class StoreError(InfluencerError, RuntimeError):
    """The run directory is not usable: a foreign or corrupt manifest, or another run holds it."""


class DirectoryLock:
    """An exclusive OS lock on ``path``, held until :meth:`release` or process exit.

    The file records the holder's process id for the message a second process gets. It is removed
    on release; a process that locked a file just removed by its holder sees that the path no
    longer names its file and tries again, so two processes never both hold the lock. With ``wait``
    seconds, a lock held by another process is waited for (the wait is logged once). The file is
    opened without following a symbolic link: a link planted at ``.lock`` is refused, never written
    through.
    """

    def __init__(self, path: Path, wait: float = 0.0) -> None:
        self.path = path
        self.fd: int | None = None
        deadline = time.monotonic() + wait
        told = False
        while True:
            holder = self._acquire()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                who = f" (process {holder})" if holder > 0 else ""
                raise StoreError(
                    f"another influencer run{who} is using {path.parent}; wait for it to finish "
                    "or choose another output directory"
                )
            if not told:
                log.info("waiting for %s, used by another influencer run (process %s)", path.parent, holder)
                told = True
            time.sleep(0.2)

    def _acquire(self) -> int | None:
        """Take the lock (None), or the holder's process id (0 if unknown)."""
        path = self.path
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP or path.is_symlink():
                    raise StoreError(
                        f"{path} is a symbolic link: a run directory's lock file must be a plain file; "
                        "remove the link (nothing was written through it)"
                    ) from None
                raise
            try:
                if not _try_lock(fd):
                    holder = _read_pid(fd)
                    os.close(fd)
                    return holder or 0
                if _same_file(fd, path):
                    os.ftruncate(fd, 0)
                    os.write(fd, str(os.getpid()).encode())
                    self.fd = fd
                    return None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed this file as we locked it: lock the new one
        raise StoreError(f"could not lock {path}; if no influencer run uses {path.parent}, delete it")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked, so no one can lock the old file afterwards
        os.close(self.fd)  # closing releases the lock
        self.fd = None

    def __del__(self) -> None:  # a store that was never closed releases its lock when collected
        with contextlib.suppress(Exception):
            self.release()


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another process holds it."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    """The holder's process id; it writes it just after locking, so wait a moment for it."""
    for _ in range(5):
        try:
            text = os.pread(fd, 32, 0) if hasattr(os, "pread") else b""
            return int(text.decode().strip())
        except (OSError, ValueError):
            time.sleep(0.01)
    return None
