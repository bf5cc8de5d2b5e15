"""The directory ``influencer index`` writes and ``influencer query`` / ``influencer explain --store``
read: a gradient index with the job it was built from.

Layout::

    <dir>/manifest.json           # a run directory (influencer.app.run.store); the job's trained
                                  # model and features are in the job cache (influencer.app.job.cache)
    <dir>/index/                  # the projected gradients (influencer.index.GradientIndex)
    <dir>/index.json              # what they were built from, written when the build completes
    <dir>/index.log
    <dir>/.lock                   # one command at a time uses a store (an OS lock)

``index.json`` records the job's settings (:data:`~influencer.app.settings.store.JOB_FIELDS`) and
the projection, so a query rebuilds the same job: the built-in one from the store alone, a
``--task`` job only with the user's own ``--task`` (a store is data and never chooses the code that
runs). Readers open the run directory locked and *frozen*: nothing in it is ever replaced by a reader.
Whether the model, data, task, parameters or dtype changed since the build is decided by the
index's fingerprint (:meth:`influencer.Influence.settings`), and said in words.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from influencer import Influence
from influencer.app.run.store import MANIFEST, RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.errors import ConfigError, InfluencerError
from influencer.files import describe_changes, json_roundtrip
from influencer.fingerprint import unverifiable
from influencer.index import GradientIndex, IndexStoreError
from influencer.index.store import FORMAT as INDEX_FORMAT
from influencer.index.store import StoreLayout

log = logging.getLogger("influencer.index")

INDEX = "index"  # the gradient index, inside the store directory
RECORD = "index.json"
LOG_FILE = "index.log"
RECORD_FORMAT = "influencer-gradient-store"
RECORD_VERSION = 2  # 2: the preconditioner records relative and absolute damping apart
_RUN_FORMAT = "influencer-run"


class GradientStoreError(InfluencerError, RuntimeError):
    """A gradient store directory cannot be used as asked: missing, foreign, unfinished, damaged,
    or built from other inputs than the job's."""


def index_path(root: str | Path) -> Path:
    return Path(root) / INDEX


def _rebuild_hint(root: Path) -> str:
    return f"influencer index --out {root} --overwrite"


# ---- opening the directory ----------------------------------------------------------------------


def _manifest_format(path: Path) -> str | None:
    """The ``format`` of ``path/manifest.json`` (None if there is none); unreadable: an error."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        value = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GradientStoreError(
            f"{manifest} is not readable JSON ({exc}): the store is damaged; delete {path} and build it "
            "again with influencer index"
        ) from None
    return value.get("format") if isinstance(value, dict) else "?"


def check_readable(root: Path) -> None:
    """Refuse, in one line that says what to do, a path that holds no finished gradient store."""
    if not root.exists():
        raise GradientStoreError(
            f"the gradient store {root} does not exist: build it with influencer index --out {root}"
        )
    if not root.is_dir():
        raise GradientStoreError(
            f"{root} is not a directory: pass the directory that influencer index --out wrote"
        )
    fmt = _manifest_format(root)
    if fmt is None:
        raise GradientStoreError(
            f"{root} holds no gradient store (no {MANIFEST}): build one with influencer index --out {root}"
        )
    if fmt == INDEX_FORMAT:
        parent = root.parent
        if root.name == INDEX and (parent / RECORD).exists():
            raise GradientStoreError(f"{root} is the index inside the store {parent}: pass --store {parent}")
        raise GradientStoreError(
            f"{root} holds a gradient index built from Python (GradientIndex.build); the command line "
            "reads stores built by influencer index (open this one with GradientIndex.open)"
        )
    if fmt != _RUN_FORMAT:
        raise GradientStoreError(
            f"{root / MANIFEST} was not written by influencer (format {fmt!r}): {root} is not a gradient "
            "store; pass the directory that influencer index --out wrote"
        )
    if not (root / RECORD).exists():
        layout, manifest = _index_manifest(root)
        if manifest is None:
            raise GradientStoreError(
                f"{root} is a run directory of another command (influencer explain?), not a gradient "
                "store: pass the directory that influencer index --out wrote"
            )
        header = manifest["header"]
        count = -(-int(header["n"]) // int(header["chunk"]))
        done = len(list((layout.root / "chunks").glob("*.json")))
        if manifest["status"] == "complete":
            done = count
        raise GradientStoreError(
            f"the gradient store {root} is unfinished ({done} of {count} chunks): run the influencer index "
            f"command that built it again (same settings) to finish it"
        )


def refuse_store_as_run(run_dir: str | Path) -> None:
    """Refuse a run directory (``--out`` of explain, evaluate, query) that holds a gradient store:
    the run's outputs replace the directory's, and would take the store's record with them."""
    run_dir = Path(run_dir)
    if (run_dir / RECORD).exists() or (run_dir / INDEX).is_dir():
        raise GradientStoreError(
            f"--out {run_dir} holds a gradient store (built by influencer index): a run there would replace "
            "its files; choose another --out (e.g. runs/explain)"
        )


def check_writable(root: Path) -> None:
    """Refuse an ``--out`` that holds something other than a gradient store (before it is opened)."""
    if not root.is_dir():
        return
    fmt = _manifest_format(root)
    if fmt == INDEX_FORMAT:
        raise GradientStoreError(
            f"{root} holds a gradient index built from Python (GradientIndex.build); the command line "
            f"keeps its index in {root / INDEX} beside the job it was built from: choose another --out"
        )
    if fmt == _RUN_FORMAT and not (root / RECORD).exists() and not index_path(root).exists():
        outputs = json.loads((root / MANIFEST).read_text()).get("outputs") or []
        if outputs:
            raise GradientStoreError(
                f"{root} holds the outputs of another command ({', '.join(outputs[:3])}), not a gradient "
                "store: choose another --out"
            )


def read_record(root: Path) -> dict[str, Any]:
    """The store's ``index.json``."""
    path = root / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GradientStoreError(
            f"{path} is not readable ({exc}): the store is damaged; build it again with {_rebuild_hint(root)}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise GradientStoreError(f"{path} was not written by influencer index: {root} is damaged")
    if record.get("version") != RECORD_VERSION:
        raise GradientStoreError(
            f"{path} has gradient-store format version {record.get('version')!r}; this influencer reads "
            f"version {RECORD_VERSION}: build it again with {_rebuild_hint(root)}"
        )
    if not isinstance(record.get("job"), dict):
        raise GradientStoreError(f"{path} is damaged (no 'job'); build it again with {_rebuild_hint(root)}")
    return record


@contextlib.contextmanager
def open_store(root: str | Path) -> Iterator[tuple[RunStore, dict[str, Any]]]:
    """The finished store at ``root`` for reading: its run directory (locked, frozen) and record."""
    root = Path(root)
    check_readable(root)
    with RunStore(root, frozen=True) as store:
        yield store, read_record(root)


def check_fingerprintable(inf: Influence) -> None:
    """Refuse a job whose inputs the store could not recognise later (see :func:`unverifiable`)."""
    unknown = unverifiable(inf.settings()["gradients"])
    if unknown:
        raise ConfigError(
            f"a gradient store cannot tell whether {', '.join(unknown[:3])} changed since it was built "
            "(source code Python cannot read, or a value without a reproducible fingerprint): define such "
            "classes and functions in a .py file and give the task plain attribute values"
        )


# ---- what changed -------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any], head: str | None = None) -> list[str]:
    """What differs between two ``Influence.settings()["gradients"]``, in words."""
    old, new = json_roundtrip(old), json_roundtrip(new)
    out = []
    om, nm = old.get("model", {}), new.get("model", {})
    if om.get("state") != nm.get("state"):
        out.append("the model's weights changed")
    oc, nc = om.get("classes", {}), nm.get("classes", {})
    if oc != nc:
        names = sorted(k for k in set(oc) | set(nc) if oc.get(k) != nc.get(k))
        out.append(f"the model's code changed ({', '.join(names[:3])})")
    if old.get("train") != new.get("train"):
        out.append("the training data changed" + (f" (the features of the head {head!r})" if head else ""))
    if old.get("task") != new.get("task"):
        what = describe_changes(old.get("task", {}), new.get("task", {}))
        out.append("the task changed" + (f" ({what})" if what else ""))
    if old.get("params") != new.get("params"):
        out.append(f"the parameters changed ({_short(old.get('params'))} -> {_short(new.get('params'))})")
    if old.get("dtype") != new.get("dtype"):
        out.append(f"the dtype changed ({old.get('dtype')} -> {new.get('dtype')})")
    rest = sorted(k for k in set(old) | set(new) if k not in {"model", "train", "task", "params", "dtype"})
    out += [f"{k} changed" for k in rest if old.get(k) != new.get(k)]
    return out


def mismatch_error(root: Path, changes: list[str]) -> GradientStoreError:
    """The one line a reader gets for a store built from other inputs."""
    return GradientStoreError(
        f"the gradient store {root} does not match this model and data: {'; '.join(changes)} since it was "
        f"built. Build it again with {_rebuild_hint(root)} (or query the model it was built for)"
    )


# ---- the index ----------------------------------------------------------------------------------


def _index_manifest(root: Path) -> tuple[StoreLayout, dict[str, Any] | None]:
    """The store's index layout and its manifest (None before a build wrote one); damage is refused."""
    layout = StoreLayout(index_path(root))
    try:
        return layout, layout.read_manifest()
    except IndexStoreError as exc:
        raise GradientStoreError(f"the gradient store {root} is damaged ({exc})") from None


def open_index(root: Path, inf: Influence, head: str | None = None) -> GradientIndex:
    """The store's index for ``inf``; a store built from other inputs is refused in words."""
    check_fingerprintable(inf)
    layout, manifest = _index_manifest(root)
    if manifest is None:
        raise GradientStoreError(
            f"the gradient store {root} has lost its index ({layout.root} holds no manifest.json): build it "
            f"again with {_rebuild_hint(root)}"
        )
    if manifest["status"] != "complete":
        raise GradientStoreError(
            f"the gradient store {root} is being rebuilt (its index is unfinished): run the influencer "
            "index command that rebuilds it again to finish it"
        )
    old = manifest["header"].get("fingerprint", {})
    changes = fingerprint_changes(old, inf.settings()["gradients"], head)
    if changes:
        raise mismatch_error(root, changes)
    try:
        return GradientIndex.open(layout.root, inf)
    except IndexStoreError as exc:
        raise GradientStoreError(f"{exc} (command line: run influencer index --out {root} again)") from None


def check_store_task(root: str | Path, task: str | None, job_given: bool = False) -> None:
    """Before any run starts: refuse to use a store built for a ``--task`` job without the user's own
    ``--task`` (see :func:`read_job_settings`)."""
    root = Path(root)
    check_readable(root)
    read_job_settings(root, read_record(root), task, job_given)


def job_of_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The job's settings a store was built with (ExplainConfig fields), as recorded."""
    job = dict(record["job"])
    if job.get("params") is not None:
        job["params"] = tuple(job["params"])
    return job


def read_job_settings(
    root: Path, record: Mapping[str, Any], task: str | None = None, job_given: bool = False
) -> dict[str, Any]:
    """:func:`job_of_record`, refusing settings this version cannot read; ``task`` is the user's own
    ``--task``. A store is data: the task it records is never imported on the store's word, so a
    store built for a ``--task`` job needs the user's ``--task`` (``job_given``: a job from Python)."""
    try:
        job = job_of_record(record)
        ExplainConfig(**job)
    except (TypeError, InfluencerError) as exc:
        raise GradientStoreError(
            f"{root / RECORD} records job settings this influencer cannot use ({exc}): build the store again "
            f"with {_rebuild_hint(root)}"
        ) from None
    recorded = job.get("task")
    if recorded is not None and task is None and not job_given:
        raise GradientStoreError(
            f"the gradient store {root} was built for --task {recorded}; a store is data and never chooses "
            f"which code runs: pass --task {recorded} yourself (if you trust that code) to use it"
        )
    if task is not None:
        if recorded != task:
            log.info("the store was built for --task %s; using --task %s", recorded, task)
        job["task"] = task
    return job


def same_directory(a: Path, b: Path) -> bool:
    """Whether two paths name one directory (links resolved where the file system allows)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
