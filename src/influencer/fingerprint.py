"""Fingerprints of what a result depends on (model code and weights, data, task), for caches that
must never serve a stale result; :meth:`influencer.Influence.settings` collects them per run."""

from influencer._kernel.fingerprint import (
    hash_examples,
    hash_json,
    hash_tensors,
    model_fingerprint,
    task_fingerprint,
    unverifiable,
)

__all__ = [
    "hash_examples",
    "hash_json",
    "hash_tensors",
    "model_fingerprint",
    "task_fingerprint",
    "unverifiable",
]
