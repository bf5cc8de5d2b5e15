"""The on-disk layout of a gradient index; every file is written atomically, nothing is pickled.

::

    <dir>/manifest.json            # header (fingerprint, projector, n, k, chunk) + status + file list
    <dir>/chunks/000012.npy        # projected training gradients of ids [12 c, 13 c), (rows, k)
    <dir>/chunks/000012.json       # written after its .npy: this chunk is complete (rows, sha256)
    <dir>/fisher.npy               # (k, k) float64: (1/n) sum_i Pg_i Pg_i^T (its layers' blocks, or all)
    <dir>/regularizer.npy          # (k,) float64: P grad Omega(theta), shared by every g_i
    <dir>/basis.npy                # a data-dependent projection's fitted basis (e.g. PCA), if any

A build first writes the manifest with ``"status": "building"`` and its header, then the chunks
(each ``.npy`` renamed into place, then its record), then commits: the chunk records move into the
manifest, with the Fisher and regulariser files, and ``"status"`` becomes ``"complete"``. A build
that dies at any point leaves only complete chunks with records, which a resumed build keeps.
Chunk files are opened memory-mapped (``numpy.load(mmap_mode="r")``), so a store larger than
memory is read one chunk at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from influencer._kernel.errors import InfluencerError
from influencer._kernel.files import (
    atomic_save_array,
    atomic_write_json,
    describe_changes,
    file_sha256,
    read_json,
)

FORMAT = "influencer-gradient-index"
VERSION = 1
MANIFEST = "manifest.json"


class IndexStoreError(InfluencerError, RuntimeError):
    """A store directory cannot be used: unwritable, damaged, foreign, or built for other inputs."""


class StoreLayout:
    """Paths and file-level operations of one store directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def chunk_path(self, j: int) -> Path:
        return self.root / "chunks" / f"{j:06d}.npy"

    def record_path(self, j: int) -> Path:
        return self.root / "chunks" / f"{j:06d}.json"

    @property
    def fisher_path(self) -> Path:
        return self.root / "fisher.npy"

    @property
    def basis_path(self) -> Path:
        return self.root / "basis.npy"

    @property
    def regularizer_path(self) -> Path:
        return self.root / "regularizer.npy"

    # ---- manifest -------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or ``None`` when there is none; a foreign or damaged one is an error."""
        path = self.manifest_path
        if not path.exists():
            return None
        fix = f"delete {self.root} or choose another directory"
        try:
            manifest = read_json(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise IndexStoreError(f"{path} is not readable JSON ({exc}); {fix}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexStoreError(f"{path} is not a gradient-index manifest (no 'format': '{FORMAT}'); {fix}")
        if manifest.get("version") != VERSION:
            raise IndexStoreError(
                f"{path} has gradient-index format version {manifest.get('version')!r}; this influencer "
                f"reads version {VERSION}; rebuild it (overwrite=True) or {fix}"
            )
        status = manifest.get("status")
        if not isinstance(manifest.get("header"), dict) or status not in ("building", "complete"):
            raise IndexStoreError(f"{path} is damaged (no header or status); {fix}")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def check_writable(self) -> None:
        """Raise a one-line :class:`IndexStoreError` unless files can be created in the directory."""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise IndexStoreError(f"{self.root} exists and is not a directory; choose another directory")
            (self.root / "chunks").mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise IndexStoreError(
                f"cannot write the index directory {self.root} ({type(exc).__name__}: "
                f"{exc.strerror or exc}); choose a writable directory (--out) or fix its permissions"
            ) from None

    def check_empty_or_index(self) -> None:
        """Refuse to write into a non-empty directory that holds no index."""
        if self.manifest_path.exists() or not self.root.is_dir():
            return
        # (another rank's write probe may be there for a moment)
        others = [
            p.name
            for p in self.root.iterdir()
            if p.name != "chunks" and not p.name.startswith(".write-test-")
        ]
        chunks = self.root / "chunks"
        if others or (chunks.is_dir() and any(chunks.iterdir())):
            held = ", ".join(sorted(others)[:5]) or "chunks/"
            raise IndexStoreError(
                f"{self.root} is not empty and holds no {MANIFEST} (it has {held}), so it is not a "
                "gradient index; refusing to write there. Choose a new or empty directory"
            )

    def clear(self) -> None:
        """Delete everything a previous build wrote (before rebuilding with other inputs)."""
        shutil.rmtree(self.root / "chunks", ignore_errors=True)
        for path in (self.manifest_path, self.fisher_path, self.regularizer_path, self.basis_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- chunks ---------------------------------------------------------------------------------

    def save_chunk(self, j: int, rows: np.ndarray, first: int) -> dict[str, Any]:
        """Write chunk ``j`` (its array, then its record); returns the record."""
        sha = atomic_save_array(self.chunk_path(j), rows)
        record = {
            "file": self.chunk_path(j).relative_to(self.root).as_posix(),
            "first": first,
            "rows": int(rows.shape[0]),
            "sha256": sha,
        }
        atomic_write_json(self.record_path(j), record)
        return record

    def chunk_record(self, j: int, first: int, rows: int, k: int, dtype: str) -> dict[str, Any] | None:
        """Chunk ``j``'s record if the chunk is complete and its file has the expected shape."""
        path = self.record_path(j)
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("first") != first or record.get("rows") != rows:
            return None
        return record if self.chunk_is_valid(j, rows, k, dtype) else None

    def chunk_is_valid(self, j: int, rows: int, k: int, dtype: str) -> bool:
        """The chunk's file exists, has the expected shape and dtype, and its full size on disk."""
        path = self.chunk_path(j)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return array.shape == (rows, k) and str(array.dtype) == dtype

    def load_chunk(self, j: int) -> np.ndarray:
        """Chunk ``j`` memory-mapped, read-only."""
        return np.load(self.chunk_path(j), mmap_mode="r", allow_pickle=False)

    def remove_records(self, count: int) -> None:
        for j in range(count):
            with contextlib.suppress(FileNotFoundError):
                self.record_path(j).unlink()


def mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed between two store headers, for error messages."""
    return describe_changes(old, new) or "the format changed"


def load_basis(layout: StoreLayout, record: dict[str, Any] | None) -> np.ndarray | None:
    """The stored basis of a data-dependent projection if it is there and its sha256 matches."""
    if not isinstance(record, dict) or not layout.basis_path.exists():
        return None
    if file_sha256(layout.basis_path) != record.get("sha256"):
        return None
    return np.load(layout.basis_path, allow_pickle=False)
