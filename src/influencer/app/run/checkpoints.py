"""A directory of checkpoint stores, as :class:`influencer.index.TrainingStore` writes them during
training (one complete store per checkpoint, ``step-<s>``, its model state and learning rate in its
header), read for ``influencer query --store DIR``.

The scores are :class:`influencer.index.CheckpointStores`': TracIn, the sum over checkpoints ``c``
of ``lr_c`` times the projected gradient dot product at ``theta_c`` (no preconditioner). Such a
directory has no record of the job (a training loop wrote it, not ``influencer index``): the job is
the user's own ``--task``, and each store's fingerprint must match its model (at the checkpoint's
state), task and data. A directory that mixes them with an ``influencer index`` store, holds a
checkpoint still being written, or checkpoints of different runs is refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from influencer import Identity
from influencer.app.job.job import Job
from influencer.app.run.gradient_store import GradientStoreError, check_store_task, index_path
from influencer.errors import ConfigError
from influencer.index import CheckpointStores, IndexStoreError
from influencer.index.store import StoreLayout

__all__ = ["Checkpoints", "is_checkpoint_directory", "open_checkpoints", "read_checkpoints", "refuse_flags"]

PATTERN = "step-*"


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """The checkpoint stores of one training run: their directories, steps and learning rates."""

    root: Path
    paths: tuple[Path, ...]
    steps: tuple[int, ...]
    lrs: tuple[float, ...]  # each checkpoint's weight in the sum
    header: dict[str, Any]  # the first store's (projector, k, n, fingerprint of the gradients)

    def text(self) -> str:
        """How the scores combine the checkpoints, in words."""
        weights = ", ".join(f"step {s}: {lr:g}" for s, lr in zip(self.steps, self.lrs, strict=True))
        return (
            f"TracIn over {len(self.steps)} checkpoints, summed with their learning rates as weights "
            f"({weights}): each term the projected gradient dot product at that checkpoint, no preconditioner"
        )

    def settings(self) -> dict[str, Any]:
        """JSON-able, for ``top_k.json`` (``scores_from_store``)."""
        return {
            "store": str(self.root),
            "checkpoints": [
                {"store": p.name, "step": s, "lr": lr}
                for p, s, lr in zip(self.paths, self.steps, self.lrs, strict=True)
            ],
            "combined": "sum over checkpoints of lr * projected gradient dot product (TracIn)",
            "projector": self.header["projector"],
            "k": self.header["k"],
            "preconditioner": {"kind": "none"},
        }


def is_checkpoint_directory(root: Path) -> bool:
    """Whether ``root`` holds ``step-*`` entries (checkpoint stores, complete or not)."""
    return root.is_dir() and any(root.glob(PATTERN))


def refuse_flags(**given: Any) -> None:
    """One line for a scoring flag (``preconditioner=...``, by setting name) given with checkpoint stores."""
    named = [name for name, value in given.items() if value is not None]
    if named:
        raise ConfigError(
            f"--{named[0].replace('_', '-')} does not apply to checkpoint stores (step-*): their scores are "
            "TracIn's, the checkpoints' projected gradient dot products summed with their learning rates"
        )


def checkpoints_or_store(root: Path, task: str | None, has_job: bool, **flags: Any) -> Checkpoints | None:
    """What ``--store root`` names, checked before anything is written: checkpoint stores
    (``step-*``; the scoring ``flags`` given are refused with them), or None for an
    ``influencer index`` store, whose task is then checked against ``--task`` (see
    :func:`~influencer.app.run.gradient_store.check_store_task`)."""
    if is_checkpoint_directory(root):  # stores a training run wrote, one per checkpoint
        refuse_flags(**flags)
        return read_checkpoints(root)
    check_store_task(root, task, has_job)
    return None


def _same_run(header: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint of one run shares: all but its step, learning rate and weights."""
    fingerprint = dict(header.get("fingerprint", {}))
    model = dict(fingerprint.get("model", {}))
    model.pop("state", None)
    return {
        **{k: v for k, v in header.items() if k != "training"},
        "fingerprint": {**fingerprint, "model": model},
    }


def read_checkpoints(root: Path) -> Checkpoints:
    """The checkpoint stores under ``root``, refusing in one line a directory that is not the
    complete stores of one run."""
    if index_path(root).exists() or (root / "index.json").exists():
        raise GradientStoreError(
            f"{root} mixes an influencer index store with checkpoint stores (step-*): keep each in a "
            "directory of its own"
        )
    paths, steps, lrs, first = [], [], [], None
    for d in sorted(root.glob(PATTERN)):
        try:
            manifest = StoreLayout(d).read_manifest() if d.is_dir() else None
        except IndexStoreError as exc:
            raise GradientStoreError(f"the checkpoint store {d} is damaged ({exc})") from None
        if manifest is None or manifest["status"] != "complete":
            raise GradientStoreError(
                f"the checkpoint store {d} is incomplete (no finished manifest.json; did training end before "
                "its window closed?): collect it again, or move it out of the directory"
            )
        header = manifest["header"]
        training = header.get("training")
        if not isinstance(training, dict):
            raise GradientStoreError(
                f"{d} is not a checkpoint store (no 'training' step and learning rate in its header): "
                "collect checkpoint stores with influencer.index.TrainingStore"
            )
        if first is not None and _same_run(header) != _same_run(first):
            differ = sorted(k for k, v in _same_run(header).items() if _same_run(first).get(k) != v)
            raise GradientStoreError(
                f"{root} mixes checkpoint stores of different runs: {paths[0].name} and {d.name} differ in "
                f"{', '.join(differ)}; keep each run's checkpoints in a directory of its own"
            )
        first = header if first is None else first
        paths.append(d)
        steps.append(int(training["step"]))
        lrs.append(float(training["lr"]))
    assert first is not None
    return Checkpoints(root, tuple(paths), tuple(steps), tuple(lrs), first)


def open_checkpoints(found: Checkpoints, job: Job, device: torch.device, batch_size: int) -> CheckpointStores:
    """The checkpoint stores opened for ``job``'s model (a copy at each checkpoint's state), over
    the parameters and dtype they were collected for; a store of another model, task or data is
    refused in one line."""
    fingerprint = found.header["fingerprint"]
    try:
        return CheckpointStores.open(
            found.root, job.model, job.task, job.train, params=fingerprint["params"],
            dtype=getattr(torch, fingerprint["dtype"]), estimator=Identity(), device=device,
            batch_size=batch_size, progress=False,
        )  # fmt: skip
    except IndexStoreError as exc:
        raise GradientStoreError(f"{exc} (pass the --task whose training wrote these checkpoints)") from None
