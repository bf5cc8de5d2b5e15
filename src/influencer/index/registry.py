"""Projectors by name: rebuild the projector a store's manifest describes."""

from __future__ import annotations

import dataclasses
from typing import Any

from influencer._kernel.errors import ConfigError
from influencer.index.kronecker import KroneckerProjector
from influencer.index.projectors import GaussianProjector, IdentityProjector, Projector, RademacherProjector


def projector_from_settings(settings: dict[str, Any]) -> Projector:
    """The projector described by :meth:`Projector.settings` (e.g. read back from a store's manifest)."""
    kinds: dict[str, type[Projector]] = {
        c.kind: c for c in (IdentityProjector, GaussianProjector, RademacherProjector, KroneckerProjector)
    }
    kind = settings.get("kind")
    if kind not in kinds:
        raise ConfigError(
            f"unknown projector kind {kind!r}; known: {', '.join(sorted(kinds))}. Pass the projector "
            "explicitly (projector=...)"
        )
    cls = kinds[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in names})
