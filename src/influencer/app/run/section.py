"""A section of a run directory: cached arrays that share one set of inputs, each written atomically
and listed in the manifest only afterwards; and the encodings they are stored in (``.npy`` without
pickle, plain JSON values)."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from influencer.app.run.lock import StoreError
from influencer.files import atomic_write_bytes, file_sha256

if TYPE_CHECKING:
    from influencer.app.run.store import RunStore

log = logging.getLogger("influencer.store")

_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


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
        check_key(key)
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


def check_key(key: str) -> None:
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
