"""Influence over a head: the head as the model and the network's features (its inputs) as the data,
the features computed once per model and kept in the job cache for every command."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from influencer.app.job.job import Job
from influencer.app.run.store import RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.fingerprint import hash_examples, hash_json, model_fingerprint, task_fingerprint
from influencer.heads import Head

log = logging.getLogger("influencer.explain")

__all__ = ["chosen_head", "fingerprint_of", "influence_job"]


def chosen_head(config: ExplainConfig, job: Job) -> str | None:
    """The head influence is computed over: the settings' ``head``, else the job's unless the
    settings choose ``params``."""
    if config.head is not None:
        return config.head
    return job.head if config.params is None else None


def fingerprint_of(model: nn.Module) -> dict[str, Any]:
    """The model's fingerprint (code and weights) from its own state."""
    return model_fingerprint(model, dict(model.state_dict()))


def influence_job(job: Job, config: ExplainConfig, cache: RunStore, device: torch.device) -> Job:
    """The job influence is computed on: ``job`` itself, or, with a head (:func:`chosen_head`),
    the head as the model and the network's features as the data.

    Everything but the report (which shows ``job``'s own examples) then runs on the head: the
    evaluation, the curvature, the gradients. The features are read from the job cache ``cache``,
    keyed by the model (code and weights), the task, the head, the dtype and each data set's
    fingerprint, or computed (one pass of the network) and kept there.
    """
    name = chosen_head(config, job)
    if name is None:
        return job
    head = Head(job.model, job.task, name)
    model = fingerprint_of(job.model)
    settings = {"head": name, "dtype": config.dtype, "task": task_fingerprint(job.task)}
    components = {
        "model weights": str(model["state"]),
        "model code": hash_json(model["classes"]),
        "settings": hash_json(settings),
    }
    section = cache.section("features-" + hash_json(components)[:16], components, {"head": name})
    out = []
    for which, data in (("training", job.train), ("test", job.test)):
        key = f"{which}-{hash_examples(data)[:24]}"
        cached = section.load(key) if key in section else None
        if cached is not None and len(cached) == len(data):
            features = torch.from_numpy(cached)
        else:
            start = time.perf_counter()
            features = head.extract(
                data, device=device, dtype=config.torch_dtype, batch_size=config.batch_size,
                progress=config.progress,
            )  # fmt: skip
            section.save(key, features)
            log.info(
                "features: the network ran once over the %d %s examples up to %r (%.1f s), kept in the "
                "job cache; influence runs on the head alone",
                len(data), which, name, time.perf_counter() - start,
            )  # fmt: skip
        out.append(head.examples(features, data))
    train, test = out
    flat = train.tensor.ndim == 2
    return dataclasses.replace(
        job,
        model=head.model,
        task=head.task,
        train=train,
        test=test,
        head=None,
        display=None,
        shown=None,
        # A flat feature row is small: all examples in one HVP batch (one call per CG iteration
        # instead of several) is cheap to hold and roughly halves the solve time on a CPU.
        hessian_batch_size=job.hessian_batch_size or (4096 if flat else None),
    )
