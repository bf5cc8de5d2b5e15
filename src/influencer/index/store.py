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
Readers take one chunk at a time, so a store larger than memory is read piece by piece, and verify
each as it is read (:meth:`StoreLayout.read_chunk`): the sha256 of the bytes read must equal the one
recorded when the chunk was written, and every value must be finite. A bit flipped on disk, a
truncated file or a NaN is refused in one line instead of being scored. The digest is computed over
the buffer the chunk is read into, not in a second pass over the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
        header = manifest.get("header")
        if not isinstance(header, dict) or status not in ("building", "complete"):
            raise IndexStoreError(f"{path} is damaged (no header or status); {fix}")
        kinds = {"fingerprint": dict, "projector": dict, "n": int, "k": int, "chunk": int}
        for key, kind in kinds.items():
            value = header.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
                raise IndexStoreError(
                    f"{path} is damaged: header.{key} is {json.dumps(value)[:60]}, not "
                    f"{'an object' if kind is dict else 'a positive integer'}; {fix}"
                )
        chunks = manifest.get("chunks", [])
        good = ("first", "rows")
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and all(isinstance(c.get(f), int) for f in good) for c in chunks
        ):
            raise IndexStoreError(f"{path} is damaged: its chunk list is not a list of chunk records; {fix}")
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

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files (``.NAME.*.tmp``) an interrupted writer left; returns their names.

        Only a build that owns the directory may call this: a live writer's temporary file would go.
        """
        removed = []
        for folder in (self.root, self.root / "chunks"):
            if not folder.is_dir():
                continue
            for path in folder.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path.relative_to(self.root).as_posix())
        return sorted(removed)

    def clear(self) -> None:
        """Delete everything a previous build wrote (before rebuilding with other inputs)."""
        shutil.rmtree(self.root / "chunks", ignore_errors=True)
        for path in (self.manifest_path, self.fisher_path, self.regularizer_path, self.basis_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- chunks ---------------------------------------------------------------------------------

    def save_chunk(self, j: int, rows: np.ndarray, first: int, record: bool = True) -> dict[str, Any]:
        """Write chunk ``j`` (its array, then, with ``record``, its record file); returns the record.

        A writer that commits the manifest right after its last chunk (nothing to resume) can
        skip the record files.
        """
        sha = atomic_save_array(self.chunk_path(j), rows)
        entry = {
            "file": self.chunk_path(j).relative_to(self.root).as_posix(),
            "first": first,
            "rows": int(rows.shape[0]),
            "sha256": sha,
        }
        if record:
            atomic_write_json(self.record_path(j), entry)
        return entry

    def chunk_record(
        self, j: int, first: int, rows: int, k: int, dtype: str, verify: bool = True
    ) -> dict[str, Any] | None:
        """Chunk ``j``'s record if the chunk is complete and its file has the expected shape (and,
        with ``verify``, the recorded sha256 and finite values)."""
        path = self.record_path(j)
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("first") != first or record.get("rows") != rows:
            return None
        if verify:
            return record if self.chunk_is_intact(j, record, k, dtype) else None
        return record if self.chunk_is_valid(j, rows, k, dtype) else None

    def chunk_is_intact(self, j: int, record: dict[str, Any], k: int, dtype: str) -> bool:
        """The chunk reads back as written: :meth:`read_chunk` accepts it."""
        try:
            self.read_chunk(j, record, k, dtype)
        except IndexStoreError:
            return False
        return True

    def chunk_is_valid(self, j: int, rows: int, k: int, dtype: str) -> bool:
        """The chunk's file exists, has the expected shape and dtype, and its full size on disk."""
        path = self.chunk_path(j)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return array.shape == (rows, k) and str(array.dtype) == dtype

    def load_chunk(self, j: int) -> np.ndarray:
        """Chunk ``j`` memory-mapped, read-only, unverified (see :meth:`read_chunk`)."""
        return np.load(self.chunk_path(j), mmap_mode="r", allow_pickle=False)

    def read_chunk(self, j: int, record: dict[str, Any], k: int, dtype: str) -> np.ndarray:
        """Chunk ``j`` ``(rows, k)`` read into memory (writable) and verified as it is read.

        The file is read once into one buffer; its sha256 is taken over that buffer and must equal
        ``record["sha256"]``, and the array it holds must be ``(record["rows"], k)`` of ``dtype`` with
        every value finite. Anything else is an :class:`IndexStoreError` naming the chunk and the fix.
        """
        path = self.chunk_path(j)
        fix = "run GradientIndex.build(influence, path, ...) with the same settings to recompute it"
        where = f"chunk {j} of the index in {self.root} ({path.name})"
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buffer = np.empty(size, np.uint8)  # writable, not zero-filled: filled by the read
                got = f.readinto(memoryview(buffer))
        except OSError as exc:
            raise IndexStoreError(f"{where} cannot be read ({exc.strerror or exc}); {fix}") from None
        if got != size or hashlib.sha256(buffer).hexdigest() != record.get("sha256"):
            raise IndexStoreError(
                f"{where} is damaged: its sha256 differs from the one recorded when it was written "
                f"(changed or truncated on disk, {size} bytes); {fix}"
            )
        try:
            header = io.BytesIO(buffer[: min(size, 1 << 16)].tobytes())
            version = np.lib.format.read_magic(header)
            npy = np.lib.format
            read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy format version {version} is not one a store writes")
            shape, fortran, stored = read_header[version](header)
        except ValueError as exc:
            raise IndexStoreError(f"{where} is not a .npy array ({exc}); {fix}") from None
        rows = record.get("rows")
        if fortran or shape != (rows, k) or str(stored) != dtype or stored.hasobject:
            raise IndexStoreError(f"{where} holds a {shape} {stored} array, not ({rows}, {k}) {dtype}; {fix}")
        start = header.tell()
        if size - start != rows * k * stored.itemsize:
            raise IndexStoreError(
                f"{where} has {size - start} bytes of data, not {rows * k * stored.itemsize}; {fix}"
            )
        array = buffer[start:].view(stored).reshape(rows, k)
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            first = int(record.get("first", 0))
            bad = (np.flatnonzero(~finite)[:10] + first).tolist()
            raise IndexStoreError(
                f"{where} holds NaN or infinite values for training id(s) {bad}: the store is damaged "
                f"(a build never writes them); {fix}"
            )
        return array

    def read_array(self, path: Path, sha256: str | None) -> np.ndarray:
        """A small stored array (Fisher, regulariser) read once, its sha256 checked on the bytes read."""
        fix = "rebuild the index with GradientIndex.build(influence, path, overwrite=True)"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IndexStoreError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IndexStoreError(
                f"{path} is damaged: its sha256 differs from the one in {MANIFEST} (changed on disk); {fix}"
            )
        return np.load(io.BytesIO(data), allow_pickle=False)

    def remove_records(self, count: int) -> None:
        for j in range(count):
            with contextlib.suppress(FileNotFoundError):
                self.record_path(j).unlink()


class ChunkWriter:
    """Writes chunks (:meth:`StoreLayout.save_chunk`) in one background thread while the caller
    computes the next: hashing, writing and flushing a chunk overlap the next chunk's gradients.

    At most ``depth`` chunks wait to be written (their arrays are held until then), so memory stays
    bounded. ``done(j)`` runs in the caller's thread, in submission order, once chunk ``j`` is on
    disk; a failed write is raised there. A chunk is queued only after the ones ``depth`` before it
    are done, so an error (or a ``done`` that raises) stops the build with nothing but finished
    chunks after it. Leaving the ``with`` block waits for every queued write.
    """

    def __init__(
        self, layout: StoreLayout, done: Callable[[int], None] | None = None, depth: int = 1
    ) -> None:
        self.layout, self.done, self.depth = layout, done, depth
        self.pending: list[tuple[int, Future[dict[str, Any]]]] = []

    def __enter__(self) -> ChunkWriter:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self._finish_one()
        finally:
            self.pool.shutdown(wait=True)

    def submit(self, j: int, rows: np.ndarray, first: int) -> None:
        """Queue chunk ``j`` (``rows`` must not change until it is written)."""
        while len(self.pending) >= self.depth:
            self._finish_one()
        self.pending.append((j, self.pool.submit(self.layout.save_chunk, j, rows, first)))

    def _finish_one(self) -> None:
        j, future = self.pending.pop(0)
        future.result()
        if self.done is not None:
            self.done(j)


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
