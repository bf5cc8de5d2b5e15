"""Operating-system errors while writing a run, in one line that says how to fix them."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def describe_os_error(exc: OSError, run_dir: str | Path | None = None) -> str:
    """One line for an operating-system error: the file, the reason and, for a file in (or the path
    of) the run directory ``run_dir``, how to fix it."""
    where = f"{exc.filename}: " if exc.filename else ""
    line = f"{where}{exc.strerror or exc}"
    # No file name: a write into an open file (a full disk), which only the run directory has here.
    if run_dir is None or (exc.filename and not _within(Path(str(exc.filename)), Path(run_dir))):
        return line
    if not exc.filename:
        line = f"{line} while writing to {run_dir}"
    fix = {
        errno.ENOSPC: "the disk is full: free some space or choose an output directory on another disk",
        getattr(errno, "EDQUOT", -1): "the disk quota is used up: free some space or choose another --out",
        errno.EROFS: "the file system is read-only: choose a writable output directory (--out)",
        errno.EACCES: "choose an output directory you can write to (--out), or fix its permissions",
        errno.EPERM: "choose an output directory you can write to (--out), or fix its permissions",
        errno.ENAMETOOLONG: "choose a shorter output directory name (--out)",
        errno.ENOTDIR: "a part of the output directory's path is a file: choose another --out",
        errno.ELOOP: "the output directory's path has a symbolic-link loop: choose another --out",
        errno.ENOENT: "a part of the output directory's path cannot be created: choose another --out",
    }.get(exc.errno or 0)
    return f"{line}; {fix}" if fix else f"{line} (in the output directory {run_dir})"


def _within(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root``, inside it, or one of its parents (lexically)."""
    a, b = os.path.abspath(path), os.path.abspath(root)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)
