"""What ``influencer explain`` explains: a :class:`Job` (task, trained model, training and test data).

A user's job comes from a function named on the command line, ``--task package.module:build``;
``build()`` takes no arguments and returns a :class:`Job`, a dict with the same keys, or a tuple
``(task, model, train, test)``. The model must already be trained; data can be in any form
:func:`influencer._kernel.data.as_examples` accepts.

Without ``--task`` the built-in job is used: :class:`influencer.models.SmallCNN` trained on
scikit-learn's bundled 8x8 digit images (no download), with its weights cached in the run directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from influencer._kernel.data import as_examples
from influencer._kernel.errors import ConfigError, ConvergenceError, TaskError
from influencer._kernel.extras import require
from influencer._kernel.fingerprint import hash_json, hash_tensors
from influencer._kernel.functional import ModelFunction
from influencer._kernel.task import ClassificationTask, Task
from influencer.app.config import ExplainConfig
from influencer.app.store import RunStore
from influencer.retraining import Retrainer
from influencer.training import fit_lbfgs, train_minibatch

log = logging.getLogger("influencer.explain")


@dataclasses.dataclass
class Job:
    """A trained model to explain, with its task and data.

    Attributes:
        task: the task the model was trained with (its per-example loss defines influence).
        model: the trained ``nn.Module``.
        train: the training data, in the order that defines training ids.
        test: the test data, in the order that defines test ids.
        name: shown in the report and the summary.
        params: default parameters to compute influence over (names or module prefixes; None = all).
        classes: names of the class labels, indexed by label (for the report).
        feature_names: names of the input features (for non-image data in the report).
        invert_images: show images dark-on-light (for data where larger values mean more ink).
        description: a sentence for the report about how the model was trained.
        display: inputs to show in the report and measure distances on, ``(train (n, ...), test
            (m, ...))``, when the model's own inputs are not what a person should look at (e.g.
            precomputed features); default: the inputs of the data.
        hessian_batch_size: examples per Hessian-vector-product batch, when the job knows a
            better value than the default 512 (``ExplainConfig.hessian_batch_size`` overrides it).
        retrain: how the model was trained, for ``influencer evaluate`` to retrain it without some
            examples (an :class:`~influencer.retraining.Retrainer`; default: L-BFGS to the optimum
            for a linear model, Adam for the configured epochs for a network).
        make_model: ``seed -> nn.Module``, a fresh untrained model of the same architecture, for
            retraining from scratch (default for a network: a copy with its layers reset).
    """

    task: Task
    model: nn.Module
    train: Any
    test: Any
    name: str = "custom job"
    params: Sequence[str] | None = None
    classes: Sequence[str] | None = None
    feature_names: Sequence[str] | None = None
    invert_images: bool = False
    description: str = ""
    display: tuple[torch.Tensor, torch.Tensor] | None = None
    hessian_batch_size: int | None = None
    retrain: Retrainer | None = None
    make_model: Callable[[int], nn.Module] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, Task):
            raise TaskError(
                f"the job's task must be an influencer.Task (e.g. ClassificationTask()), got "
                f"{type(self.task).__name__}"
            )
        if not isinstance(self.model, nn.Module):
            raise TaskError(f"the job's model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.retrain is not None and not isinstance(self.retrain, Retrainer):
            raise ConfigError(
                "the job's retrain must be an influencer.retraining.Retrainer (e.g. "
                f"AdamRetrainer(epochs=30)), got {type(self.retrain).__name__}"
            )
        if self.make_model is not None and not callable(self.make_model):
            raise ConfigError("the job's make_model must be a function seed -> a fresh nn.Module")
        self.train = as_examples(self.train)
        self.test = as_examples(self.test)
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
        if self.feature_names is not None:
            self.feature_names = [str(c) for c in self.feature_names]
        if self.display is not None:
            train_x, test_x = (torch.as_tensor(x) for x in self.display)
            if len(train_x) != len(self.train) or len(test_x) != len(self.test):
                raise ConfigError(
                    f"display inputs must have one row per example: got {len(train_x)} and {len(test_x)} "
                    f"for {len(self.train)} training and {len(self.test)} test examples"
                )
            self.display = (train_x, test_x)


_JOB_FIELDS = [f.name for f in dataclasses.fields(Job)]


def as_job(result: Any, source: str = "build()") -> Job:
    """A :class:`Job` from what a build function returned (Job, dict, or 4-tuple)."""
    if isinstance(result, Job):
        return result
    if isinstance(result, Mapping):
        unknown = [k for k in result if k not in _JOB_FIELDS]
        missing = [k for k in ("task", "model", "train", "test") if k not in result]
        if unknown or missing:
            raise ConfigError(
                f"{source} returned a dict with "
                + (f"unknown keys {unknown}" if unknown else f"missing keys {missing}")
                + f"; expected keys task, model, train, test (optional: {', '.join(_JOB_FIELDS[4:])})"
            )
        return Job(**result)
    if isinstance(result, (tuple, list)) and len(result) == 4:
        return Job(*result)
    raise ConfigError(
        f"{source} must return (task, model, train, test), a dict with those keys, or an "
        f"influencer.app.jobs.Job; got {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
    )


def load_job(spec: str) -> Job:
    """Import ``package.module:function``, call it, and check what it returns."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"cannot import {module_name!r} (from --task {spec}): no module named {exc.name!r}. Run from "
                "the folder that contains it, add that folder to PYTHONPATH, or pip install the package"
            ) from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (from --task {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec} is not callable: it must be a function returning the job")
    job = as_job(obj(), f"{spec}()")
    if job.name == "custom job":
        job.name = spec
    return job


# ---- the built-in job: a small CNN on scikit-learn's digits --------------------------------------


def digits_job(config: ExplainConfig, store: RunStore, device: torch.device) -> Job:
    """SmallCNN on the 8x8 digits, trained (or loaded from the run directory's cache).

    Training: Adam for ``config.epochs`` epochs on ``mean cross-entropy + weight_decay/2 ||w||^2``,
    then the linear head alone is fitted to the exact optimum of that objective with L-BFGS in
    float64 (features fixed). The objective is convex in the head, so the head is then the
    minimiser influence functions assume, and influence over the head (the default ``params``)
    predicts what refitting it without a training image would do, as in Koh & Liang's
    Inception experiments.
    """
    from influencer.models import SmallCNN
    from influencer.paper.datasets import load_digits

    require("sklearn", "the built-in digits job (its images come with scikit-learn)", "data")
    split = load_digits(images=True, seed=0)
    n = len(split.x_train) if config.train_size is None else min(config.train_size, len(split.x_train))
    train = (split.x_train[:n], split.y_train[:n])
    test = split.test
    task = ClassificationTask(weight_decay=config.weight_decay)
    settings = {
        "model": "SmallCNN",
        "channels": config.channels,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.train_batch_size,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "head": "lbfgs-float64",
    }
    section = store.section(
        "model",
        {"training data": hash_tensors(train), "training settings": hash_json(settings)},
        {"training": settings, "n_train": n},
    )
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(config.seed)
        model = SmallCNN(num_classes=10, channels=config.channels)
    state = {k: section.load(k) for k in model.state_dict()} if len(section) else {}
    if state and all(v is not None for v in state.values()):
        model.double().load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        log.info("model: loaded the trained SmallCNN from the cache (%s)", section.meta.get("trained", "?"))
    else:
        start = time.perf_counter()
        log.info(
            "model: training SmallCNN on %d digit images (%d epochs of Adam, lr %g, weight decay %g) on %s",
            n,
            config.epochs,
            config.lr,
            config.weight_decay,
            device,
        )
        history = train_minibatch(
            model,
            task,
            train,
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.train_batch_size,
            seed=config.seed,
            device=device,
            progress=config.progress,
        )
        model.double()
        fit_head(model, task, train, device)
        elapsed = time.perf_counter() - start
        for k, v in model.state_dict().items():
            section.save(k, v)
        section.set_meta(trained=f"{elapsed:.1f} s, final epoch loss {history[-1]:.4f}", epoch_losses=history)
        log.info("model: trained in %.1f s (final epoch loss %.4f)", elapsed, history[-1])
    model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    about = (
        f"{n} training and {len(test[0])} test images (8x8). SmallCNN ({n_params} parameters) trained "
        f"{config.epochs} epochs with Adam, then its linear head fitted to the optimum of mean "
        f"cross-entropy + {config.weight_decay:g}/2 ||w||^2 with L-BFGS (float64)."
    )
    common = {
        "task": task,
        "name": "SmallCNN on scikit-learn digits",
        "classes": list(split.classes),
        "invert_images": True,
        "display": (train[0], test[0]),
    }
    if config.params is not None:  # influence over chosen layers of the whole network
        return Job(model=model, train=train, test=test, description=about, **common)
    # Influence over the head alone (the default) only ever needs the head's inputs: the network's
    # features, fixed. Computing them once makes every gradient and Hessian-vector product a
    # linear-layer operation instead of a pass through the convolutions (the scores are the same as
    # Influence(model, params=["head"]) on the images; tests/test_explain.py checks it).
    with torch.no_grad():
        features = [_features(model, x, device) for x in (train[0], test[0])]
    return Job(
        model=HeadOnFeatures(model.head),
        train=(features[0], train[1]),
        test=(features[1], test[1]),
        description=about + " Influence over the head, on the network's fixed features.",
        # All examples in one batch: a linear layer's HVP on 256 features is cheap to hold, and one
        # call per CG iteration instead of three roughly halves the solve time on a CPU.
        hessian_batch_size=4096,
        **common,
    )


class HeadOnFeatures(nn.Module):
    """A network's final layer as a model of its own, on precomputed features ``(n, d)``.

    Its parameters keep the network's names (``head.weight``, ``head.bias``) and are the same
    tensors, so influence over it is influence over the network's head.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def _features(model: nn.Module, x: torch.Tensor, device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """``model.features`` of images ``(n, 1, 8, 8)`` in float64, ``(n, d)``, computed in chunks."""
    return torch.cat(
        [model.features(x[i : i + chunk].to(device, torch.float64)) for i in range(0, len(x), chunk)]
    )


def fit_head(model: nn.Module, task: Task, train: Any, device: torch.device) -> None:
    """Fit ``model.head`` to the optimum of the task's objective with the features fixed, in place.

    The objective is convex in the head (cross-entropy of a linear map plus L2). The features are
    computed once, so L-BFGS works on a linear model with the same optimum (the other layers'
    weight decay is constant in the head): each of its few hundred steps on this ill-conditioned
    problem (weight decay 1e-3) is then a cheap matrix product instead of a pass through the
    convolutions. ``model`` must already be float64.
    """
    x, y = train
    with torch.no_grad():
        features = _features(model, x, device)
    fn = ModelFunction(model.head, task, None, device, torch.float64)
    try:
        theta = fit_lbfgs(fn, as_examples((features, y.to(device))))
    except ConvergenceError as exc:  # the Adam solution is still a fine model to explain
        log.warning("model: the head did not reach the optimum (%s); keeping the Adam weights", exc)
        return
    shift = float((theta - fn.theta0).norm() / fn.theta0.norm().clamp_min(1e-30))
    fn.load_into(theta)
    log.info("model: head fitted to the optimum (relative change %.2g)", shift)


def labels_of(batch: Any) -> torch.Tensor | None:
    """The label tensor ``(B,)`` of a batch, when it has one: ``batch[1]`` or a ``label``-like key."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
    elif isinstance(batch, Mapping):
        key = next((k for k in ("label", "labels", "y", "target", "targets") if k in batch), None)
        y = batch[key] if key is not None else None
    else:
        y = None
    if isinstance(y, torch.Tensor) and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        return y.reshape(-1)
    return None


def inputs_of(batch: Any) -> torch.Tensor | None:
    """The input tensor ``(B, ...)`` of a batch: ``batch[0]``, an ``input``-like key, or the batch."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in ("image", "images", "input", "inputs", "x", "features", "pixel_values"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
        floats = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return floats[0] if floats else None
    return None


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
