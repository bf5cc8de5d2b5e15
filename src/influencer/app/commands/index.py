"""``influencer index`` as a Python function: build (or resume) a job's gradient store.

Usage::

    from influencer.app.commands.index import build_index
    from influencer.app.settings.store import IndexConfig
    built = build_index(IndexConfig(out="runs/index", task="mypkg.jobs:build"))
    built.index.top_k(test, k=10)

The job is built as ``influencer explain`` builds it (:mod:`~influencer.app.job.job`, the same checks
before the work), every training gradient is projected and streamed to ``out/index`` in chunks
(:class:`~influencer.index.GradientIndex`), and ``out/index.json`` records what the store was built
from (:mod:`~influencer.app.run.gradient_store`). The same call again resumes an interrupted build, or
does nothing when the store is complete; a store built from other inputs is refused in one line
saying what changed, unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from influencer import Identity, Influence
from influencer.app.job.job import Job
from influencer.app.run.cached import optimality_of_norms
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import (
    LOG_FILE,
    RECORD,
    RECORD_FORMAT,
    RECORD_VERSION,
    GradientStoreError,
    check_fingerprintable,
    check_writable,
    fingerprint_changes,
    index_path,
)
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.store import RunStore, jsonable
from influencer.app.run.store_scoring import preconditioning, projection_text
from influencer.app.settings.store import DEFAULT_K, DEFAULT_K_IN, DEFAULT_K_OUT, JOB_FIELDS, IndexConfig
from influencer.app.steps import build_influence, prepare
from influencer.errors import ConfigError
from influencer.files import describe_changes
from influencer.index import (
    GaussianProjector,
    GradientIndex,
    IdentityProjector,
    IndexStoreError,
    KroneckerProjector,
    Projector,
    RademacherProjector,
)
from influencer.index.store import StoreLayout
from influencer.layers import find_layers, is_supported

log = logging.getLogger("influencer.index")

__all__ = ["IndexBuild", "build_index", "choose_projector"]


@dataclasses.dataclass
class IndexBuild:
    """What :func:`build_index` built; the same is on disk in ``root``."""

    config: IndexConfig
    root: Path
    index: GradientIndex
    record: dict[str, Any]
    timings: dict[str, float]


def build_index(config: IndexConfig, job: Job | None = None, *, console: bool = True) -> IndexBuild:
    """Build, resume or check the store ``config.out`` (see the module docstring); ``job``
    overrides ``config.task``."""
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    root = Path(config.out)
    check_writable(root)
    title, settings = f"influencer index: store {root}", config.to_json()
    with opened_run(root, console, log, title, file_name=LOG_FILE, settings=settings) as (store, warned):
        return _build(config, job, store, warned)


def _changed(root: Path, changes: list[str]) -> GradientStoreError:
    return GradientStoreError(
        f"{root} holds a gradient store built from other inputs: {'; '.join(changes)}. Pass --overwrite to "
        "rebuild it, or choose another --out"
    )


def _build(config: IndexConfig, job: Job | None, store: RunStore, warned: list[str]) -> IndexBuild:
    clock = Stopwatch(config.device)
    job_config = config.job_config()
    with clock("total"):
        prepared = prepare(job_config, clock, job)
        # gradients only: queries choose the preconditioner
        inf, _ = build_influence(job_config, prepared, Identity(), "the store's gradients (no curvature yet)")
        check_fingerprintable(inf)
        projector, why = choose_projector(config, inf)
        log.info("projector: %s", why)
        head = prepared.head
        up_to_date = _prepare(store, inf, projector, config, head)
        with clock("index"):
            index = GradientIndex.build(
                inf,
                index_path(store.root),
                projector,
                chunk=config.chunk,
                fisher="layers",  # what every query's projected Fisher uses
                fisher_dtype=config.fisher_torch_dtype,
                overwrite=config.overwrite,
                progress=config.progress,
            )
        optimality = _previous_optimality(store.root) if up_to_date else None
        if optimality is None:
            with clock("optimality"):
                optimality = projected_optimality(index)
    job_fields = {name: getattr(job_config, name) for name in JOB_FIELDS}
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "job": job_fields,
        "job_name": prepared.job.name,
        "head": head,
        "n_train": inf.n,
        "n_test": len(prepared.job.test),
        "num_parameters": inf.p,
        "parameters": inf.fn.names,
        "dtype": config.dtype,
        "projector": projector.settings(),
        "projection": index.projection.info,
        "k": index.k,
        "projector_choice": why,
        "chunk": config.chunk,
        # the default of queries and of explain --store (each may choose another)
        "preconditioner": preconditioning({}, config.preconditioner, config.relative_damping, config.damping),
        "optimality": optimality,
        "warnings": list(warned),
        "timings_s": {k: round(v, 4) for k, v in clock.timings.items()},
        "settings": config.to_dict(),
    }
    record = jsonable(record)
    store.commit_outputs({RECORD: (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8")})
    log.info("store: %s", projection_text(record))
    log.info("done in %.1f s; wrote %s", clock.timings["total"], store.root / RECORD)
    return IndexBuild(config, store.root, index, record, clock.timings)


def _prepare(
    store: RunStore, inf: Influence, projector: Projector, config: IndexConfig, head: str | None
) -> bool:
    """Compare the index already in the store (if any) with this build: refuse one built from other
    inputs (unless ``overwrite``), and say whether the build starts, resumes or has nothing to do
    (then True)."""
    layout = StoreLayout(index_path(store.root))
    try:
        manifest = layout.read_manifest()
    except IndexStoreError as exc:
        if not config.overwrite:
            raise GradientStoreError(f"{exc}. Pass --overwrite to rebuild it") from None
        layout.clear()
        manifest = None
    if manifest is None:
        log.info("building a new store")
        return False
    header = manifest["header"]
    changes = fingerprint_changes(header.get("fingerprint", {}), inf.settings()["gradients"], head)
    # the storage dtype follows the compute dtype (already named if it changed)
    old = {k: v for k, v in header.get("projector", {}).items() if k != "dtype"}
    new = {k: v for k, v in projector.settings().items() if k != "dtype"}
    if old != new:
        changes.append(f"the projector changed ({describe_changes(old, new) or 'kind'})")
    if header.get("chunk") != config.chunk:
        changes.append(f"the chunk size changed ({header.get('chunk')} -> {config.chunk})")
    if header.get("fisher_dtype") != config.fisher_dtype:
        was, now = header.get("fisher_dtype") or "the store's", config.fisher_dtype or "the store's"
        changes.append(f"the Fisher's product dtype changed ({was} -> {now})")
    if changes:
        if not config.overwrite:
            raise _changed(store.root, changes)
        log.info("rebuilding the store (--overwrite): %s", "; ".join(changes))
        store.commit_outputs(
            {}
        )  # the old record goes first: a half-rebuilt store is never read as the old one
        return False
    if manifest["status"] == "complete":
        log.info("the store is up to date: nothing to compute")
        return True
    count = -(-int(header["n"]) // int(header["chunk"]))
    done = len(list((layout.root / "chunks").glob("*.json")))
    log.info("resuming the build: %d of %d chunks already stored", done, count)
    return False


def _previous_optimality(root: Path) -> dict[str, float] | None:
    """The optimality recorded by the build that completed the store (None if there is no record)."""
    try:
        found = json.loads((root / RECORD).read_text()).get("optimality")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def choose_projector(config: IndexConfig, inf: Influence) -> tuple[Projector, str]:
    """The projector the settings ask for, and why it was chosen (for the log)."""
    p, dtype = inf.p, config.dtype
    kind = config.projector
    layered, not_layers = _layers(inf)
    if kind is None:
        if config.k is not None:
            kind, reason = "gaussian", "--k sets a dense projection"
        elif layered is not None or config.k_in is not None or config.k_out is not None:
            kind = "kronecker"
            reason = f"every chosen parameter is in an nn.Linear or nn.Conv2d layer ({layered} layers)"
        elif p <= DEFAULT_K:
            return IdentityProjector(dtype=dtype), (
                f"identity (the exact gradients, k = p = {p}): some chosen parameters are not in an "
                f"nn.Linear or nn.Conv2d layer ({not_layers}), and p is at most the default k = {DEFAULT_K}"
            )
        else:
            kind = "gaussian"
            reason = f"some chosen parameters are not in an nn.Linear or nn.Conv2d layer ({not_layers})"
    else:
        reason = "--projector " + kind
    if kind == "identity":
        return IdentityProjector(dtype=dtype), f"identity (the exact gradients, k = p = {p}; {reason})"
    if kind == "kronecker":
        if layered is None:
            raise ConfigError(
                f"the Kronecker projector needs every chosen parameter in an nn.Linear or nn.Conv2d layer "
                f"({not_layers}): use --projector gaussian (any parameters), or --params naming such layers"
            )
        k_in, k_out = config.k_in or DEFAULT_K_IN, config.k_out or DEFAULT_K_OUT
        basis = config.basis or "pca"
        projector: Projector = KroneckerProjector(
            k_in=k_in, k_out=k_out, seed=config.seed, basis=basis, dtype=dtype
        )
        bound = projector.bind(inf.fn)
        whole = [
            f"{d['layer']} ({d['k_out']}x{d['k_in']}: it has {d['d_out']} outputs, {d['d_in']} inputs)"
            for d in bound.info.get("layers", [])
            if d["k_out"] == d["d_out"] or d["k_in"] == d["d_in"]
        ]
        if whole:
            reason += (
                f"; a side with no more outputs than --k-out {k_out} or inputs than --k-in {k_in} is kept "
                f"whole (exact) for {', '.join(whole[:4])}"
                + (f" and {len(whole) - 4} more" if len(whole) > 4 else "")
            )
        return (
            projector,
            f"kronecker {k_out}x{k_in} per layer ({basis} basis), k = {bound.k} of p = {p} ({reason})",
        )
    k = config.k
    if k is None:
        k = min(DEFAULT_K, p)
        if k < DEFAULT_K:
            reason += f"; k = p = {p}, as p is less than the default k = {DEFAULT_K}"
    elif k > p:
        raise ConfigError(
            f"--k {k} is more than the {p} chosen parameters: a projection to more dimensions than p adds "
            f"nothing; choose --k {p} or less, or --projector identity to store the exact gradients"
        )
    cls = RademacherProjector if kind == "rademacher" else GaussianProjector
    return cls(k=k, seed=config.seed, dtype=dtype), f"{kind}, k = {k} of p = {p} ({reason})"


def _layers(inf: Influence) -> tuple[int | None, str]:
    """(number of layers of a Kronecker projection, or None; which chosen parameters are not in one)."""
    try:
        return len(find_layers(inf.fn)), ""
    except ConfigError as exc:
        modules = dict(inf.fn.model.named_modules())
        bad = []
        for name in inf.fn.names:
            path, _, attr = name.rpartition(".")
            module = modules.get(path)
            if module is None or not is_supported(module) or attr not in ("weight", "bias"):
                bad.append(name)
        if len(bad) > 3:
            return None, f"{', '.join(bad[:3])} and {len(bad) - 3} more"
        return None, ", ".join(bad) if bad else str(exc).split(";")[0]


def projected_optimality(index: GradientIndex) -> dict[str, float]:
    """How far the model is from a minimum (:func:`~influencer.app.run.cached.optimality`), from the
    stored projected gradients: projections preserve norms in expectation, so this estimates the
    ratio of the mean gradient's norm to a typical example's. One pass over the store."""
    total = torch.zeros(index.k, dtype=torch.float64)
    norms = 0.0
    for j in range(index.num_chunks):
        ids = torch.arange(j * index.chunk, min((j + 1) * index.chunk, index.n))
        rows = index.gradients(ids).double().cpu()
        total += rows.sum(0)
        norms += float(rows.norm(dim=1).sum())
    return optimality_of_norms(float((total / index.n).norm()), norms / index.n)
