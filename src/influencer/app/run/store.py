"""A run directory: cached arrays listed in ``manifest.json``, checked by fingerprints, safe to resume.

Layout::

    <run>/manifest.json          # what is cached, under which fingerprints (JSON, human-readable)
    <run>/cache/<section>/*.npy  # one array per entry (np.save, never pickled)
    <run>/...                    # outputs, committed as one set by :meth:`RunStore.commit_outputs`
    <run>/.lock                  # held (an OS file lock) while a run uses the directory

A *section* holds entries computed from the same inputs, e.g. the training-gradient chunks of one
model on one data set. It is opened with *components*: named fingerprints of everything its
entries depend on (``{"model weights": sha, "training data": sha, "settings": sha}``). If they
differ from the recorded ones, the section's entries are dropped and the change is reported, so a
stale cache is never reused. Entries are written atomically (temporary file, fsync,
``os.replace``) and listed in the manifest only afterwards, so a run killed at any point leaves a
manifest that names only complete files, and the next run resumes from there.

A run's outputs (scores, report, summary, ...) are replaced as one set: they are written in full
into a staging folder, a journal naming them is written, and only then are they moved into place
(``summary.json`` last, the previous one removed first). A run killed while moving them leaves the
journal behind, and whoever opens the directory next finishes the move, so a reader never sees the
new scores beside the previous run's report for longer than the move itself takes.

Only one process uses a run directory at a time: :class:`RunStore` takes an exclusive OS lock
(``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) on ``.lock`` before it reads anything, and
the operating system releases it when the process ends, however it ends. Network file systems
that do not implement these locks cannot give that guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from influencer.errors import InfluencerError
from influencer.files import atomic_write_bytes, describe_changes, file_sha256, write_durable

FORMAT = "influencer-run"
VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".lock"
_STAGING = ".staging"  # the next output set, written in full before any output is replaced
_JOURNAL = ".commit.json"  # present while a complete output set is being moved into place
_TEMPORARY = (_LOCK, _STAGING, _JOURNAL)
_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

log = logging.getLogger("influencer.store")


class StoreError(InfluencerError, RuntimeError):
    """The run directory is not usable: a foreign or corrupt manifest, or another run holds it."""


class SectionChangedError(StoreError):
    """A section of a frozen store was asked for with other inputs than its entries were made from."""

    def __init__(self, message: str, section: str, changed: list[str], details: str) -> None:
        super().__init__(message)
        self.section = section
        self.changed = changed  # names of the components that differ, e.g. ["model weights"]
        self.details = details  # the settings that differ, e.g. "head 'fc' -> 'classifier'"


# ---- atomic files --------------------------------------------------------------------------------


def array_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` encoding of a numeric array (object arrays are refused: they would pickle)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise StoreError("refusing to store an object array: it could only be saved with pickle")
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_array(path: Path) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling."""
    return np.load(path, allow_pickle=False)


# ---- the run directory ---------------------------------------------------------------------------


class Section:
    """Cached arrays that share one set of inputs (see the module docstring)."""

    def __init__(self, store: RunStore, name: str, record: dict[str, Any]) -> None:
        self.store = store
        self.name = name
        self.record = record

    @property
    def directory(self) -> Path:
        return self.store.root / "cache" / self.name

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form JSON-able facts about the section (saved with the manifest)."""
        return self.record["meta"]

    def keys(self) -> list[str]:
        return list(self.record["entries"])

    def __contains__(self, key: str) -> bool:
        return key in self.record["entries"]

    def __len__(self) -> int:
        return len(self.record["entries"])

    def save(self, key: str, array: np.ndarray | Tensor) -> None:
        """Write one entry atomically, then list it in the manifest."""
        _check_key(key)
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        data = array_bytes(array)
        path = self.directory / f"{key}.npy"
        atomic_write_bytes(path, data)
        self.record["entries"][key] = {
            "file": path.relative_to(self.store.root).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
        }
        self.store.flush()

    def load(self, key: str) -> np.ndarray | None:
        """The entry's array, or ``None`` if it is missing or damaged (then it is forgotten)."""
        entry = self.record["entries"].get(key)
        if entry is None:
            return None
        path = self.store.root / entry["file"]
        problem = None
        if not path.is_file():
            problem = "its file is missing"
        elif file_sha256(path) != entry["sha256"]:
            problem = "its file does not match the recorded checksum"
        else:
            array = read_array(path)
            if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
                problem = "its shape or dtype differs from the manifest"
        if problem is not None:
            log.warning("%s: cached entry %r is unusable (%s); recomputing it", self.name, key, problem)
            del self.record["entries"][key]
            self.store.flush()
            return None
        return array

    def set_meta(self, **values: Any) -> None:
        self.record["meta"].update(values)
        self.store.flush()


def _check_key(key: str) -> None:
    if not key or not set(key) <= _KEY_CHARS or key.startswith("."):
        raise StoreError(f"cache keys may use letters, digits, '-', '_' and '.'; got {key!r}")


def jsonable(obj: Any, limit: int | None = None) -> Any:
    """Plain JSON values (non-finite floats as strings); lists cut to ``limit`` items if given."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, limit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, limit) for v in (obj if limit is None else obj[:limit])]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


class RunStore:
    """A run directory with a manifest of cached arrays (see the module docstring).

    Opening it takes the directory's exclusive lock (a second process gets a :class:`StoreError`
    naming the holder), then reads or creates the manifest and finishes a commit of outputs that an
    earlier, killed run left half done. Use as a context manager, or call :meth:`close`, to
    release the lock.

    A ``frozen`` store is one that other results depend on (a gradient store's trained model and
    features): a section asked for with other inputs raises :class:`SectionChangedError` instead of
    dropping its entries. Missing entries may still be added.
    """

    def __init__(self, root: str | Path, frozen: bool = False, wait: float = 0.0) -> None:
        self.root = Path(root)
        self.frozen = frozen
        self._lock: _DirectoryLock | None = None
        self._check_usable()
        self._lock = _DirectoryLock(self.root / _LOCK, wait)
        try:
            self.manifest = self._read_or_create()
            self._finish_commit()
            self._drop_temporaries()
        except BaseException:
            self.close()
            raise

    # ---- manifest -------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _check_usable(self) -> None:
        """Refuse, before anything is created, a path that cannot be or is not a run directory."""
        root = self.root
        if root.is_symlink() and not root.exists():
            raise StoreError(
                f"{root} is a symbolic link to {os.readlink(root)}, which does not exist; create the "
                "target directory or choose another output directory"
            )
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} exists and is not a directory; choose another output directory")
        if root.is_dir():
            # Listed before the manifest is looked for: a run creating the directory at this moment
            # writes its manifest before any other file, so its files never look foreign here.
            others = _foreign_entries(root)
            if others and not self.manifest_path.exists():
                raise StoreError(
                    f"{root} is not empty and has no {MANIFEST}, so it is not an influencer run "
                    f"directory (it holds {', '.join(sorted(others)[:5])}); refusing to write there. "
                    "Choose a new or empty output directory"
                )
        root.mkdir(parents=True, exist_ok=True)

    def _read_or_create(self) -> dict[str, Any]:
        path = self.manifest_path
        if path.exists():
            return self._validated(path)
        others = _foreign_entries(self.root)
        if others:  # appeared after the first look; still not a run directory
            raise StoreError(
                f"{self.root} is not empty and has no {MANIFEST}, so it is not an influencer run "
                f"directory (it holds {', '.join(sorted(others)[:5])}); refusing to write there. "
                "Choose a new or empty output directory"
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sections": {},
        }
        self.manifest = manifest
        self.flush()
        return manifest

    def _validated(self, path: Path) -> dict[str, Any]:
        fix = f"delete {self.root} or choose another output directory"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path} is not readable JSON ({exc}); {fix}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path} was not written by influencer (no 'format': '{FORMAT}'); {fix}")
        if manifest.get("version") != VERSION:
            raise StoreError(
                f"{path} has run-directory format version {manifest.get('version')!r}; this influencer "
                f"reads version {VERSION}; {fix}"
            )
        sections = manifest.get("sections")
        if not isinstance(sections, dict) or not all(
            isinstance(s, dict)
            and isinstance(s.get("components"), dict)
            and isinstance(s.get("entries"), dict)
            and isinstance(s.get("meta"), dict)
            for s in sections.values()
        ):
            raise StoreError(f"{path} is damaged (its 'sections' are malformed); {fix}")
        for section in sections.values():
            for key, entry in section["entries"].items():
                bad_entry = not isinstance(entry, dict) or not {"file", "sha256", "shape", "dtype"} <= set(
                    entry
                )
                if bad_entry or not _inside(self.root, self.root / str(entry["file"])):
                    raise StoreError(f"{path} is damaged (entry {key!r} is malformed); {fix}")
        return manifest

    def flush(self) -> None:
        """Write the manifest atomically."""
        text = json.dumps(self.manifest, indent=1, sort_keys=True)
        atomic_write_bytes(self.manifest_path, text.encode())

    # ---- sections -------------------------------------------------------------------------------

    def section(
        self, name: str, components: Mapping[str, str], details: Mapping[str, Any] | None = None
    ) -> Section:
        """Open (or create) a section whose entries depend on ``components`` (name -> fingerprint).

        ``details`` are the JSON-able settings behind the fingerprints; when they change, the log
        line says which ones did. Entries recorded under other components are deleted.
        """
        _check_key(name)
        components = dict(components)
        details = json.loads(json.dumps(dict(details or {}), sort_keys=True, default=str))
        sections = self.manifest["sections"]
        old = sections.get(name)
        if old is not None and old["components"] == components:
            if old["entries"]:
                log.info("%s: reusing %d cached entries", name, len(old["entries"]))
            return Section(self, name, old)
        if old is not None and old["entries"]:
            changed = [k for k in components if old["components"].get(k) != components[k]]
            changed += [k for k in old["components"] if k not in components]
            what = describe_changes(old.get("details", {}), details)
            if self.frozen:
                raise SectionChangedError(
                    f"{self.root}: the cached {name} were made from other inputs ({', '.join(changed)}"
                    f"{': ' + what if what else ''}); this directory is only read here",
                    name,
                    changed,
                    what,
                )
            log.info(
                "%s: inputs changed (%s%s); recomputing instead of reusing %d cached entries",
                name,
                ", ".join(changed),
                f": {what}" if what else "",
                len(old["entries"]),
            )
        shutil.rmtree(self.root / "cache" / name, ignore_errors=True)
        record = {"components": components, "details": details, "entries": {}, "meta": {}}
        sections[name] = record
        self.flush()
        return Section(self, name, record)

    # ---- outputs --------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.path(name)
        atomic_write_bytes(path, data)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, allow_nan=False) + "\n")

    def write_array(self, name: str, array: np.ndarray | Tensor) -> Path:
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        return self.write_bytes(name, array_bytes(array))

    def commit_outputs(self, files: Mapping[str, bytes], last: str | None = None) -> dict[str, Path]:
        """Replace the run's previous outputs by ``files`` (name -> bytes) as one set.

        Every file is written to a staging folder first; then a journal naming them is written
        (the commit point), the file named ``last`` of the previous set is removed, the new files
        are moved into place (``last`` at the end), and the previous set's other files that the
        new one lacks are removed. A process killed before the journal exists leaves the previous
        outputs untouched; one killed after it leaves a journal that :class:`RunStore` completes
        when the directory is next opened. Returns name -> path.
        """
        for name in files:
            _check_output_name(name)
        order = [n for n in files if n != last] + ([last] if last in files else [])
        staging = self.root / _STAGING
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            for name in order:
                write_durable(staging / name, files[name])
            _fsync_directory(staging)
        except BaseException:  # e.g. a full disk: the previous outputs stay as they were
            shutil.rmtree(staging, ignore_errors=True)
            raise
        previous = [n for n in self.manifest.get("outputs", []) if isinstance(n, str)]
        journal = {"files": order, "remove": [n for n in previous if n not in files], "first": last}
        atomic_write_bytes(self.root / _JOURNAL, json.dumps(journal).encode())
        self._finish_commit()
        return {name: self.path(name) for name in order}

    def _finish_commit(self) -> None:
        """Complete the commit a journal describes (see :meth:`commit_outputs`), or drop a staging
        folder that never reached its journal."""
        journal_path, staging = self.root / _JOURNAL, self.root / _STAGING
        if not journal_path.exists():
            if staging.exists():
                log.debug("dropping the outputs of an unfinished run (they were never committed)")
                shutil.rmtree(staging, ignore_errors=True)
            return
        try:
            journal = json.loads(journal_path.read_text())
            order = [str(n) for n in journal["files"]]
            remove = [str(n) for n in journal["remove"]]
            first = journal.get("first")
            for name in [*order, *remove]:
                _check_output_name(name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"{journal_path} is damaged ({exc}); delete it and {staging} to keep the previous "
                "outputs, or delete the run directory"
            ) from exc
        if first is not None and (staging / str(first)).exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(str(first)))  # no complete-looking mix while files move
        for name in order:
            if (staging / name).exists():
                os.replace(staging / name, self.path(name))
        for name in remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
        _fsync_directory(self.root)
        self.manifest["outputs"] = order
        self.flush()
        os.unlink(journal_path)
        shutil.rmtree(staging, ignore_errors=True)

    def _drop_temporaries(self) -> None:
        """Delete the temporary files of atomic writes a killed process never renamed (nobody else
        writes here while this store holds the lock)."""
        for folder in [self.root, *(p for p in (self.root / "cache").glob("*") if p.is_dir())]:
            for path in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()

    # ---- locking --------------------------------------------------------------------------------

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory's lock (the store must not be used afterwards)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def entries(self) -> Iterator[tuple[str, str]]:
        """``(section, key)`` of every cached entry."""
        for name, section in self.manifest["sections"].items():
            for key in section["entries"]:
                yield name, key


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _foreign_entries(root: Path) -> list[str]:
    """Names in ``root`` that a run directory being created could not hold (its lock, staging
    folder, journal and temporary files are expected)."""
    return [
        p.name
        for p in root.iterdir()
        if p.name not in _TEMPORARY and not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp"))
    ]


def _check_output_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name in (MANIFEST, "cache"):
        raise StoreError(f"an output must be a plain file name in the run directory, got {name!r}")


def _fsync_directory(path: Path) -> None:
    """Make renames in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _DirectoryLock:
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
