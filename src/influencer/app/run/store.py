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
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from influencer.app.run.lock import DirectoryLock, StoreError
from influencer.app.run.os_errors import describe_os_error
from influencer.app.run.section import (
    Section,
    SectionChangedError,
    array_bytes,
    check_key,
    jsonable,
    read_array,
)
from influencer.files import atomic_write_bytes, describe_changes, write_durable

FORMAT = "influencer-run"
VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".lock"
_STAGING = ".staging"  # the next output set, written in full before any output is replaced
_JOURNAL = ".commit.json"  # present while a complete output set is being moved into place
_TEMPORARY = (_LOCK, _STAGING, _JOURNAL)

log = logging.getLogger("influencer.store")

__all__ = [
    "MANIFEST",
    "RunStore",
    "Section",
    "SectionChangedError",
    "StoreError",
    "array_bytes",
    "describe_os_error",
    "jsonable",
    "read_array",
    "write_durable",
]


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
        self._lock: DirectoryLock | None = None
        self._check_usable()
        self._lock = DirectoryLock(self.root / _LOCK, wait)
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
        check_key(name)
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
