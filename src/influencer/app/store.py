"""A run directory: cached arrays listed in ``manifest.json``, checked by fingerprints, safe to resume.

Layout::

    <run>/manifest.json          # what is cached, under which fingerprints (JSON, human-readable)
    <run>/cache/<section>/*.npy  # one array per entry (np.save, never pickled)
    <run>/...                    # outputs written with :meth:`RunStore.write_bytes` and friends

A *section* holds entries computed from the same inputs, e.g. the training-gradient chunks of one
model on one data set. It is opened with *components*: named fingerprints of everything its
entries depend on (``{"model weights": sha, "training data": sha, "settings": sha}``). If they
differ from the recorded ones, the section's entries are dropped and the change is reported, so a
stale cache is never reused. Entries are written atomically (temporary file, fsync,
``os.replace``) and listed in the manifest only afterwards, so a run killed at any point leaves a
manifest that names only complete files, and the next run resumes from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from influencer._kernel.errors import InfluencerError

FORMAT = "influencer-run"
VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".lock"
_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

log = logging.getLogger("influencer.store")


class StoreError(InfluencerError, RuntimeError):
    """The run directory is not usable: a foreign or corrupt manifest, or another run holds it."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- atomic files --------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        elif _file_sha256(path) != entry["sha256"]:
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
    """What differs between two settings dicts, e.g. ``"damping 0.001 -> 0.01"``."""
    a, b = flatten(old), flatten(new)
    parts = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "unset") != b.get(k, "unset"):
            x, y = json.dumps(a.get(k, "unset"), default=str), json.dumps(b.get(k, "unset"), default=str)
            parts.append(f"{k} {x} -> {y}" if len(x) + len(y) < 100 else k)
    return ", ".join(parts)


class RunStore:
    """A run directory with a manifest of cached arrays (see the module docstring).

    Use as a context manager: it takes a lock file so that two runs never write the same
    directory at once, and releases it on exit (a lock left by a killed process is taken over).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._locked = False
        self.manifest = self._read_or_create()

    # ---- manifest -------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read_or_create(self) -> dict[str, Any]:
        path = self.manifest_path
        if path.exists():
            return self._validated(path)
        if self.root.exists():
            if not self.root.is_dir():
                raise StoreError(
                    f"{self.root} exists and is not a directory; choose another output directory"
                )
            others = [p.name for p in self.root.iterdir() if p.name != _LOCK]
            if others:
                raise StoreError(
                    f"{self.root} is not empty and has no {MANIFEST}, so it is not an influencer run "
                    f"directory (it holds {', '.join(sorted(others)[:5])}); refusing to write there. "
                    "Choose a new or empty output directory"
                )
        self.root.mkdir(parents=True, exist_ok=True)
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

    # ---- locking --------------------------------------------------------------------------------

    def __enter__(self) -> RunStore:
        lock = self.root / _LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    raise StoreError(
                        f"another influencer run (process {holder}) is using {self.root}; wait for it "
                        "or choose another output directory"
                    ) from None
                log.debug("taking over the lock left by process %s", holder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return self
        raise StoreError(f"could not lock {self.root}: remove {lock} if no run is using it")

    def __exit__(self, *exc: object) -> None:
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / _LOCK)
            self._locked = False

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


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
