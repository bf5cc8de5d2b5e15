"""How scores are computed from a gradient store: its preconditioner (the store's default or the one
asked for, with damping that means what it means everywhere: ``damping`` absolute,
``relative_damping`` relative to the curvature's mean eigenvalue), and how that is said in words."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer import EKFAC, Identity, Influence
from influencer.app.settings.explain import ExplainConfig
from influencer.app.settings.store import check_preconditioner
from influencer.app.settings.values import DEFAULT_RELATIVE_DAMPING
from influencer.data import Examples
from influencer.errors import ConfigError
from influencer.estimators import Estimator
from influencer.files import json_roundtrip
from influencer.index import (
    EstimatorPreconditioner,
    GradientIndex,
    NoPreconditioner,
    Preconditioner,
    ProjectedFisher,
)

__all__ = [
    "Subset",
    "describe_store",
    "preconditioner_text",
    "preconditioning",
    "projection_text",
    "scoring_settings",
    "store_preconditioner",
]


class Subset(Examples):
    """Examples ``ids`` ``(m,)`` of another set, in that order, read lazily."""

    def __init__(self, data: Examples, ids: np.ndarray) -> None:
        self.data = data
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Tensor) -> Any:
        return self.data.take(self.ids[indices.cpu()])


def preconditioning(
    record: Mapping[str, Any],
    kind: str | None = None,
    relative: float | None = None,
    damping: float | None = None,
) -> dict[str, Any]:
    """``{"kind", "relative_damping", "damping"}`` of a query: the given ones, else the store's
    default (``influencer index --preconditioner --relative-damping --damping``); a kind other than
    the store's gets :data:`DEFAULT_RELATIVE_DAMPING` and no absolute damping unless given."""
    stored = record.get("preconditioner") or {}
    stored_kind = stored.get("kind", "fisher")
    kind = stored_kind if kind is None else kind
    same = kind == stored_kind
    check_preconditioner(kind, relative, damping)  # the settings' own check, for a store's default too
    if kind == "none":
        return {"kind": kind, "relative_damping": 0.0, "damping": 0.0}
    if relative is None:
        relative = stored.get("relative_damping") if same else None
    if damping is None:
        damping = stored.get("damping") if same else None
    return {
        "kind": kind,
        "relative_damping": float(DEFAULT_RELATIVE_DAMPING if relative is None else relative),
        "damping": float(damping or 0.0),
    }


def make_preconditioner(settings: Mapping[str, Any]) -> tuple[Preconditioner, Estimator]:
    """The preconditioner :func:`preconditioning` describes, and the estimator the query's
    :class:`Influence` carries (EK-FAC for ``ekfac``; none needed otherwise)."""
    kind, relative, damping = settings["kind"], settings["relative_damping"], settings["damping"]
    if kind == "fisher":
        return ProjectedFisher(damping=damping, relative_damping=relative), Identity()
    if kind == "none":
        return NoPreconditioner(), Identity()
    if kind == "ekfac":
        return EstimatorPreconditioner(), EKFAC(damping=damping, relative_damping=relative)
    raise ConfigError(f"unknown preconditioner {kind!r}; choose fisher, ekfac or none")


def store_preconditioner(
    record: Mapping[str, Any], config: ExplainConfig
) -> tuple[Preconditioner, Estimator, dict[str, Any]]:
    """The preconditioner, estimator and damping record of a run scored from a store."""
    settings = preconditioning(record, config.preconditioner, config.relative_damping, config.damping)
    pre, estimator = make_preconditioner(settings)
    kind = "none" if settings["kind"] == "none" else "relative"
    damping = {"kind": kind, "absolute": settings["damping"], "relative": settings["relative_damping"]}
    return pre, estimator, damping


def preconditioner_text(pre: Preconditioner, index: GradientIndex, inf: Influence) -> str:
    """How the test directions were formed, in words."""
    if isinstance(pre, ProjectedFisher):
        layers = len(index.projection.blocks)
        shape = f"block-diagonal over {layers} layers, " if layers > 1 and pre.blocks == "layers" else ""
        damping = f"relative damping {pre.relative_damping:g}"
        if pre.damping:
            damping += f" + {pre.damping:g}"
        return f"the projected Fisher ({shape}{damping})"
    if isinstance(pre, NoPreconditioner):
        return "nothing: projected gradient dot products (TracIn at one checkpoint)"
    est = inf.estimator
    damping = f"relative damping {getattr(est, 'relative_damping', 0.0):g}"
    if est.damping:
        damping += f" + {est.damping:g}"
    return f"{est.name.upper()} before projection ({damping}, {inf.curvature_kind} curvature)"


def projection_text(record: Mapping[str, Any]) -> str:
    """The store's projection in words, e.g. ``"Kronecker, k = 2048 (32x32 per layer, 2 layers, PCA
    basis; seed 0), stored as float32"``."""
    settings, info = record["projector"], record.get("projection", {})
    kind, k, p = settings.get("kind"), record.get("k"), record.get("num_parameters")
    dtype = settings.get("dtype")
    if kind == "identity":
        return f"none: the exact gradients (k = p = {k}), stored as {dtype}"
    if kind == "kronecker":
        shapes = [f"{d['k_out']}x{d['k_in']}" for d in info.get("layers", [])]
        per = (
            shapes[0]
            if len(set(shapes)) == 1
            else ", ".join(shapes[:4]) + (", ..." if len(shapes) > 4 else "")
        )
        basis = settings.get("basis", "random")
        basis = "PCA basis" if basis == "pca" else "random basis"
        return (
            f"Kronecker, k = {k} of p = {p} ({per} per layer, {len(shapes)} layers, {basis}; "
            f"seed {settings.get('seed')}), stored as {dtype}"
        )
    return f"{str(kind).capitalize()}, k = {k} of p = {p} (seed {settings.get('seed')}), stored as {dtype}"


def scoring_settings(
    root: Path, record: Mapping[str, Any], pre: Preconditioner, index: GradientIndex
) -> dict[str, Any]:
    """How scores were computed from a store, JSON-able (for top_k.json and summary.json)."""
    return json_roundtrip(
        {
            "store": str(root),
            "projector": record["projector"],
            "k": record["k"],
            "built": record.get("built"),
            "preconditioner": pre.settings(index),
        }
    )


def describe_store(root: Path, record: Mapping[str, Any]) -> str:
    """One line about a store, for logs."""
    return (
        f"gradient store {root}: {record.get('job_name')}, {record.get('n_train')} training examples, "
        f"{projection_text(record)}"
    )
