"""Retrained parameters kept on disk: the same refit is computed once, also across processes.

Checks of influence against retraining (leave-one-out, linear datamodeling scores) cost one refit
per subset of the training data, far more than the influence itself. Wrapped in a
:class:`CachedRetrainer`, a :class:`~influencer.retraining.Retrainer` stores each refit under a key
of everything it depends on, so evaluating several estimators reuses the same refits, and an
interrupted evaluation resumes::

    retrain = CachedRetrainer(AdamRetrainer(epochs=60), "runs/lds/retrained")
    theta = retrain.refit(influence, ids, start)      # computed once, then read back

The key is the sha256 of: ``influence.settings()["gradients"]`` (model classes and state, training
data, task, parameter choice, dtype; not the curvature or the estimator, which retraining does not
use), the recipe's :meth:`~influencer.retraining.Retrainer.settings`, the training ids and the
start ``(p,)``. Layout::

    <directory>/manifest.json       # format marker; a foreign manifest is refused
    <directory>/<key>.npy           # the refitted parameters (p,), np.save without pickle
    <directory>/<key>.json          # what the key was made of, readable

Each file is written atomically (temporary file, fsync, rename), the ``.npy`` last, so an entry is
either complete or absent. An entry that cannot be read or does not have ``p`` finite values is
recomputed.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer._kernel.files import atomic_write_bytes
from influencer._kernel.fingerprint import hash_json, hash_tensors
from influencer.influence import Influence
from influencer.retraining import Indices, Retrainer

FORMAT = "influencer-retrained"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class CachedRetrainer(Retrainer):
    """``retrainer``'s refits, stored in ``directory`` and read back when asked for again."""

    retrainer: Retrainer
    directory: str | Path

    def __post_init__(self) -> None:
        if not isinstance(self.retrainer, Retrainer):
            raise ConfigError(f"retrainer must be a Retrainer, got {type(self.retrainer).__name__}")
        root = Path(self.directory)
        manifest = root / "manifest.json"
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{manifest} is not readable JSON ({exc}); delete {root}") from exc
            if (
                not isinstance(found, dict)
                or found.get("format") != FORMAT
                or found.get("version") != VERSION
            ):
                raise ConfigError(
                    f"{root} is not a retraining cache of this version (its manifest.json is not "
                    f"{FORMAT!r} version {VERSION}); choose another directory or delete it"
                )
        else:
            if root.exists() and not root.is_dir():
                raise ConfigError(f"{root} exists and is not a directory; choose another cache directory")
            root.mkdir(parents=True, exist_ok=True)
            body = json.dumps({"format": FORMAT, "version": VERSION}, indent=2) + "\n"
            atomic_write_bytes(manifest, body.encode())

    def settings(self) -> dict[str, Any]:
        return self.retrainer.settings()  # where the refits are kept does not change them

    def with_seed(self, seed: int) -> CachedRetrainer:
        return dataclasses.replace(self, retrainer=self.retrainer.with_seed(seed))

    def key(self, influence: Influence, ids: Indices, start: Tensor) -> dict[str, Any]:
        """What a refit depends on, JSON-able (its hash names the entry)."""
        idx = influence.train.check_indices(ids)
        return {
            "influence": influence.settings()["gradients"],
            "recipe": self.retrainer.settings(),
            "ids": "all" if ids is None else hash_tensors(idx.to(torch.int64).cpu()),
            "n_ids": len(idx),
            "start": hash_tensors(start.detach().cpu()),
        }

    def refit(self, influence: Influence, ids: Indices = None, start: Tensor | None = None) -> Tensor:
        theta0 = self._start(influence, start)
        key = self.key(influence, ids, theta0)
        name = hash_json(key)[:40]
        path = Path(self.directory) / f"{name}.npy"
        cached = self._read(path, influence.p)
        if cached is not None:
            return torch.from_numpy(cached).to(influence.device, influence.theta.dtype)
        theta = self.retrainer.refit(influence, ids, theta0)
        text = json.dumps(key, indent=1, default=str) + "\n"
        atomic_write_bytes(path.with_suffix(".json"), text.encode())
        buf = io.BytesIO()
        np.save(buf, theta.detach().cpu().numpy(), allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
        return theta

    @staticmethod
    def _read(path: Path, p: int) -> np.ndarray | None:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent or unreadable: computed again
        if array.shape != (p,) or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            return None
        return array
