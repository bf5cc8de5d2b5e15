"""Files that are never seen half-written: atomic writes, arrays without pickle, settings diffs.

Every writer here puts its bytes in a temporary file in the same directory, flushes it to disk and
renames it into place (``os.replace`` is atomic on POSIX), so a reader sees either the old file or
the whole new one, and a process killed mid-write leaves only a stray ``.tmp`` file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from influencer._kernel.errors import UnsafePathError


def current_umask() -> int:
    """The process's umask: read from /proc where there is one (setting it to read it, the only
    portable way, changes it for other threads for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _durable(f: IO[bytes]) -> None:
    """Flush ``f`` to disk and give it the permissions the umask gives a new file (``mkstemp``
    would leave 0600)."""
    f.flush()
    os.fsync(f.fileno())
    if hasattr(os, "fchmod"):
        os.fchmod(f.fileno(), 0o666 & ~current_umask())


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and flush it to disk, without following a symbolic
    link at ``path`` (:func:`open_no_follow`; for files a caller renames into place itself, e.g. a
    staged set of outputs)."""
    with open_no_follow(path, "w") as f:
        f.write(data)
        _durable(f)


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` to a temporary file beside ``path``, make it durable, then rename it
    into place: readers see the old file or the whole new one, never half. The rename replaces a
    symbolic link at ``path`` itself; nothing is ever written through one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            _durable(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_OPEN_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT,  # truncated once checked (see open_no_follow)
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "+": os.O_RDWR | os.O_CREAT,  # read and write, created if missing, kept (a lock file)
}


def open_no_follow(
    path: str | Path, how: str = "w", *, text: bool = False, permissions: int = 0o666
) -> IO[Any]:
    """Open ``path`` to write without following a link planted there; refuse anything but a file.

    ``how``: ``"w"`` (create or truncate), ``"a"`` (create or append), ``"x"`` (create; an existing
    file is an error), ``"+"`` (read and write, created if missing, never truncated: a lock file).
    The last component of ``path`` is opened with ``O_NOFOLLOW`` (a symbolic link there is refused,
    not written through) and ``O_NONBLOCK`` (a FIFO does not hang the open); what was opened must be
    a regular file with no other hard link, else :class:`UnsafePathError` says what is there and what
    to do. Truncation (``"w"``) happens only after those checks, so a refused file is left as it was.
    Links in the directories above ``path`` are followed: the caller chose that directory.
    Returns a binary file object (``text=True``: UTF-8 text, line-buffered for logs).
    """
    if how not in _OPEN_FLAGS:
        raise ValueError(f"how must be one of {sorted(_OPEN_FLAGS)}, got {how!r}")
    path = Path(path)
    fix = "remove it (influencer writes its own file there) or choose another directory"
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not nofollow and path.is_symlink():  # no O_NOFOLLOW (Windows): checked before the open
        raise UnsafePathError(f"{path} is a symbolic link to {os.readlink(path)}; {fix}")
    flags = _OPEN_FLAGS[how] | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, permissions)
    except OSError as exc:
        if path.is_symlink():  # ELOOP on Linux, EMLINK or EFTYPE elsewhere
            raise UnsafePathError(f"{path} is a symbolic link to {os.readlink(path)}; {fix}") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, or a socket
            raise UnsafePathError(f"{path} is a FIFO or socket, not a file; {fix}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{path} is not a regular file (mode {stat.filemode(info.st_mode)}); {fix}")
        if info.st_nlink > 1:
            raise UnsafePathError(
                f"{path} has {info.st_nlink - 1} other hard link(s): writing it would change another "
                f"file; {fix}"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        if how == "w":
            os.ftruncate(fd, 0)
        mode = {"w": "wb", "a": "ab", "x": "wb", "+": "r+b"}[how]
        if text:
            return os.fdopen(fd, mode.replace("b", ""), encoding="utf-8", buffering=1)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (byte-identical for equal objects)."""
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_save_array(path: Path, array: np.ndarray) -> str:
    """Save a numeric array as ``.npy`` atomically (never pickled); returns its file's sha256."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise TypeError("refusing to store an object array: it could only be saved with pickle")
    digest = hashlib.sha256()

    class _Hashing:
        def __init__(self, f: IO[bytes]) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            digest.update(data)
            return self.f.write(data)

    def save(f: IO[bytes]) -> None:
        out = _Hashing(f)
        try:
            # np.save's own bytes (its version 1.0 header, then the values in C order), but the
            # values hashed and written from the array's memory: np.save copies them through
            # tobytes() into a file object that is not a real file
            np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
        except ValueError:  # a header too long for version 1.0
            np.save(out, array, allow_pickle=False)  # type: ignore[arg-type]
            return
        if array.size:
            out.write(memoryview(array.reshape(-1)).cast("B"))

    _atomic(Path(path), save)
    return digest.hexdigest()


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one flat dict with dotted keys (``{"task.weight_decay": 0.001}``)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two settings dicts, e.g. ``"projector.k 256 -> 512, model.state"``
    (long values by their key only)."""
    a, b = flatten(old), flatten(new)
    parts = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "unset") != b.get(k, "unset"):
            x, y = json.dumps(a.get(k, "unset"), default=str), json.dumps(b.get(k, "unset"), default=str)
            parts.append(f"{k} {x} -> {y}" if len(x) + len(y) < 100 else k)
    return ", ".join(parts)
