"""Checkpointed top-k query results: finished test blocks on disk, so a long query can resume.

::

    <dir>/manifest.json           # fingerprint of the query + the finished blocks, rewritten per block
    <dir>/blocks/000003.ids.npy    # (2, rows, k) int64: helpful ids, harmful ids of test block 3
    <dir>/blocks/000003.scores.npy # (2, rows, k): their scores

A block's two files are written (atomically) before the manifest lists it, so every listed block
is complete. The fingerprint covers the index, the preconditioner, the test data, ``k`` and the
block size; a directory holding another query's results is refused (or cleared with
``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer._kernel.files import (
    atomic_save_array,
    atomic_write_json,
    describe_changes,
    json_roundtrip,
    read_json,
)
from influencer._kernel.scores import TopK
from influencer.index.store import IndexStoreError
from influencer.index.topk import concat_rows

FORMAT = "influencer-query"
VERSION = 1


class QueryResult:
    """Top-k results of one query, stored block by block (see the module docstring)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def m(self) -> int:
        """Number of test examples."""
        return int(self.settings["m"])

    @property
    def k(self) -> int:
        return int(self.settings["k"])

    @property
    def num_blocks(self) -> int:
        return -(-self.m // int(self.settings["block"]))

    @property
    def done(self) -> list[int]:
        """Finished test blocks."""
        return sorted(int(b) for b in self.manifest["blocks"])

    @property
    def complete(self) -> bool:
        return len(self.manifest["blocks"]) == self.num_blocks

    # ---- files ----------------------------------------------------------------------------------

    @staticmethod
    def _read(root: Path) -> dict[str, Any] | None:
        path = root / "manifest.json"
        if not path.exists():
            return None
        try:
            manifest = read_json(path)
        except (OSError, ValueError) as exc:
            raise IndexStoreError(
                f"{path} is not readable JSON ({exc}); delete {root} or choose another directory"
            ) from exc
        if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (
            FORMAT,
            VERSION,
        ):
            raise IndexStoreError(
                f"{path} is not a version-{VERSION} query-result manifest; delete {root} or choose "
                "another directory"
            )
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> QueryResult:
        """The results stored in ``root`` (complete or not)."""
        manifest = cls._read(Path(root))
        if manifest is None:
            raise IndexStoreError(f"{root} holds no query results (no manifest.json); run the query first")
        return cls(root, manifest)

    @classmethod
    def create_or_resume(
        cls, root: str | Path, settings: dict[str, Any], overwrite: bool = False, write: bool = True
    ) -> QueryResult:
        """Results for a query with ``settings``: resumed if ``root`` holds the same query's blocks.

        ``write=False`` (ranks other than 0) only reads what is there.
        """
        root = Path(root)
        settings = json_roundtrip(settings)
        manifest = cls._read(root)
        if manifest is not None and manifest["settings"] != settings:
            if not overwrite:
                changes = describe_changes(manifest["settings"], settings)
                raise IndexStoreError(
                    f"{root} holds results of another query ({changes}); "
                    "pass overwrite=True to replace them, or choose another checkpoint directory"
                )
            manifest = None
            if write:
                shutil.rmtree(root / "blocks", ignore_errors=True)
        if manifest is None:
            manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "blocks": {}}
            if write:
                try:
                    (root / "blocks").mkdir(parents=True, exist_ok=True)
                    atomic_write_json(root / "manifest.json", manifest)
                except OSError as exc:
                    raise IndexStoreError(
                        f"cannot write query results to {root} ({type(exc).__name__}: "
                        f"{exc.strerror or exc}); choose a writable directory or fix its permissions"
                    ) from None
        return cls(root, manifest)

    def _paths(self, b: int) -> tuple[Path, Path]:
        base = self.root / "blocks" / f"{b:06d}"
        return base.with_suffix(".ids.npy"), base.with_suffix(".scores.npy")

    def save_block(self, b: int, top: TopK) -> None:
        """Write test block ``b``'s results, then list it in the manifest."""
        ids_path, scores_path = self._paths(b)
        ids = torch.stack([top.helpful_ids, top.harmful_ids]).cpu().numpy()
        scores = torch.stack([top.helpful_scores, top.harmful_scores]).cpu().numpy()
        record = {
            "rows": int(ids.shape[1]),
            "ids_sha256": atomic_save_array(ids_path, ids),
            "scores_sha256": atomic_save_array(scores_path, scores),
        }
        self.manifest["blocks"][str(b)] = record
        atomic_write_json(self.root / "manifest.json", self.manifest)

    def load_block(self, b: int) -> TopK | None:
        """Block ``b``'s results, or ``None`` if it is not listed or its files are unusable."""
        record = self.manifest["blocks"].get(str(b))
        if record is None:
            return None
        ids_path, scores_path = self._paths(b)
        try:
            # each file read once; its sha256, recorded when it was written, checked on those bytes
            data = {name: path.read_bytes() for name, path in (("ids", ids_path), ("scores", scores_path))}
            if any(hashlib.sha256(data[n]).hexdigest() != record.get(f"{n}_sha256") for n in data):
                return None  # changed on disk since it was written: recomputed
            ids = np.load(io.BytesIO(data["ids"]), allow_pickle=False)
            scores = np.load(io.BytesIO(data["scores"]), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if ids.shape != scores.shape or ids.ndim != 3 or ids.shape[1] != record["rows"]:
            return None
        i, s = torch.from_numpy(ids), torch.from_numpy(scores)
        return TopK(i[0], s[0], i[1], s[1])

    def top_k(self) -> TopK:
        """All test examples' results ``(m, k)``; an error if the query has not finished."""
        if not self.complete:
            raise IndexStoreError(
                f"the query in {self.root} has finished {len(self.done)} of {self.num_blocks} test blocks; "
                "run it again with the same checkpoint directory to finish it"
            )
        parts = []
        for b in range(self.num_blocks):
            part = self.load_block(b)
            if part is None:
                raise IndexStoreError(
                    f"test block {b} in {self.root} is damaged; run the query again to recompute it"
                )
            parts.append(part)
        return concat_rows(parts)

    def forget(self, b: int) -> None:
        """Drop a damaged block from the manifest so it is recomputed."""
        if self.manifest["blocks"].pop(str(b), None) is not None:
            atomic_write_json(self.root / "manifest.json", self.manifest)
        for path in self._paths(b):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
