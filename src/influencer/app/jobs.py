"""What ``influencer explain`` explains: a :class:`Job` (task, trained model, training and test data).

A user's job comes from a function named on the command line, ``--task package.module:build``;
``build()`` takes no arguments and returns a :class:`Job`, a dict with the same keys, or a tuple
``(task, model, train, test)``. The model must already be trained; data can be in any form
:func:`influencer._kernel.data.as_examples` accepts.

Without ``--task`` the built-in job is used: :class:`influencer.models.SmallCNN` trained on
scikit-learn's bundled 8x8 digit images (no download), with its weights cached in the run directory.

A job may name a ``head``: influence is then computed over that module alone, on the network's
features (the head's inputs), computed once and cached in the run directory
(:func:`influence_job`, :mod:`influencer.heads`). How the report shows examples is the job's
``display`` (:mod:`influencer.app.display`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from influencer._kernel.data import as_examples
from influencer._kernel.errors import ConfigError, ConvergenceError, InfluencerError, TaskError
from influencer._kernel.extras import require
from influencer._kernel.fingerprint import (
    hash_examples,
    hash_json,
    hash_tensors,
    model_fingerprint,
    task_fingerprint,
)
from influencer._kernel.functional import ModelFunction
from influencer._kernel.task import ClassificationTask, Task
from influencer.app.config import ExplainConfig
from influencer.app.display import Display, as_display, choose_display, inputs_of
from influencer.app.store import RunStore
from influencer.heads import FeatureExamples, Head, original_batch
from influencer.retraining import Retrainer
from influencer.training import fit_lbfgs, train_minibatch

__all__ = [
    "Job",
    "as_job",
    "chosen_head",
    "digits_job",
    "fit_head",
    "head_features",
    "influence_job",
    "inputs_of",
    "labels_of",
    "load_job",
]

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
        feature_names: names of the input features (tables in the report).
        invert_images: show images dark-on-light (for data where larger values mean more ink).
        description: a sentence for the report about how the model was trained.
        display: how the report shows an example: a :class:`~influencer.app.display.Display`
            (``TextDisplay(tokenizer)``, ``TableDisplay(names, importance=...)``, ...) or a
            function ``batch -> list[str]`` of texts; default: chosen from the data
            (:func:`~influencer.app.display.choose_display`).
        hessian_batch_size: examples per Hessian-vector-product batch, when the job knows a
            better value than the default 512 (``ExplainConfig.hessian_batch_size`` overrides it).
        tokenizer: decodes token ids for the report (anything with ``decode``; a Hugging Face
            tokenizer), used when the data are dicts with ``input_ids``.
        head: compute influence over this module alone (e.g. ``"classifier"``) on the network's
            fixed features, its inputs: they are computed once and cached, and every gradient and
            Hessian-vector product is then a pass of the head alone. The scores are those of
            ``params=[head]`` on the whole network (see :mod:`influencer.heads`). Explicit
            ``params`` in the settings turn it off unless ``head`` is set there too.
        shown: what the report shows instead of the model's inputs, ``(train, test)`` with one
            entry per example: lists of strings (texts), or arrays/tensors (e.g. the images when
            the model reads precomputed features).
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
    display: Display | Callable[[Any], Sequence[str]] | None = None
    hessian_batch_size: int | None = None
    tokenizer: Any = None
    head: str | None = None
    shown: tuple[Any, Any] | None = None
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
        if isinstance(self.display, (tuple, list)) and len(self.display) == 2 and self.shown is None:
            self.shown, self.display = tuple(self.display), None  # the older form: inputs to show
        self.display = as_display(self.display)
        if self.shown is not None:
            self.shown = _as_shown(self.shown, len(self.train), len(self.test))
        if self.head is not None:
            if not isinstance(self.head, str) or not self.head:
                raise ConfigError(
                    f"the job's head must be a module name such as 'classifier', got {self.head!r}"
                )
            Head(self.model, self.task, self.head)  # refuses a head that cannot be separated, naming why

    def shown_batch(self, which: str, ids: torch.Tensor) -> Any:
        """What the report shows of examples ``ids`` of the ``"train"`` or ``"test"`` set."""
        if self.shown is not None:
            data = self.shown[0 if which == "train" else 1]
            if isinstance(data, list):
                return [data[i] for i in ids.tolist()]
            return data.take(ids.cpu())
        return (self.train if which == "train" else self.test).take(ids)

    def chosen_display(self) -> Display:
        """The job's display, or the one :func:`~influencer.app.display.choose_display` picks."""
        if self.display is not None:
            return self.display
        sample = self.shown_batch("train", torch.arange(min(2, len(self.train))))
        return choose_display(
            sample,
            tokenizer=self.tokenizer,
            feature_names=self.feature_names,
            invert_images=self.invert_images,
        )


def _as_shown(shown: Any, n_train: int, n_test: int) -> tuple[Any, Any]:
    if not isinstance(shown, (tuple, list)) or len(shown) != 2:
        raise ConfigError("a job's shown data must be a pair (train, test)")
    out = []
    for part, n, which in zip(shown, (n_train, n_test), ("training", "test"), strict=True):
        if isinstance(part, (list, tuple)) and part and all(isinstance(s, str) for s in part):
            data: Any = list(part)
        else:
            data = as_examples(part)
        if len(data) != n:
            raise ConfigError(
                f"shown data must have one entry per example: got {len(data)} for the {n} {which} examples"
            )
        out.append(data)
    return out[0], out[1]


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


class JobError(InfluencerError, RuntimeError):
    """The function named by ``--task`` failed or cannot be called as a job's build function."""


def load_job(spec: str) -> Job:
    """Import ``package.module:function``, call it, and check what it returns.

    This runs the user's code (the module's top level, then the function): ``--task`` is as
    trusted as any script the user runs. Objects that cannot be a build function (not callable,
    built-in, or needing arguments) are refused before they are called; an exception inside the
    build function becomes one line naming it, its traceback in the run's log.
    """
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
    check_build_function(obj, spec)
    try:
        result = obj()
    except Exception as exc:
        log.debug("%s() raised:", spec, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise JobError(
            f"{spec}() raised {type(exc).__name__}" + (f": {first}" if first else "") + " (the traceback "
            "is in explain.log in the run directory)"
        ) from exc
    job = as_job(result, f"{spec}()")
    if job.name == "custom job":
        job.name = spec
    return job


def check_build_function(obj: Any, spec: str) -> None:
    """Refuse, without calling it, an object that cannot be a job's build function."""
    if not callable(obj):
        raise ConfigError(f"{spec} is not callable: it must be a function returning the job")
    if inspect.isbuiltin(obj) or (isinstance(obj, type) and not issubclass(obj, Job)):
        kind = "a built-in function" if inspect.isbuiltin(obj) else "a class"
        raise ConfigError(
            f"{spec} is {kind}, not a function that builds a job: name a function defined in your code "
            "that takes no arguments and returns (task, model, train, test)"
        )
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to check: the call itself will tell
        return
    try:
        signature.bind()
    except TypeError:
        raise ConfigError(
            f"{spec}{signature} needs arguments; --task names a function that takes none and returns "
            "(task, model, train, test)"
        ) from None


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
    from influencer.datasets import load_digits
    from influencer.models import SmallCNN

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
    return Job(
        task=task,
        model=model,
        train=train,
        test=test,
        name="SmallCNN on scikit-learn digits",
        classes=list(split.classes),
        invert_images=True,
        description=about,
        # Influence over the head (the default) needs only its inputs, the network's features:
        # computed once, they make every gradient and Hessian-vector product a linear-layer
        # operation instead of a pass through the convolutions, with the same scores.
        head="head",
    )


def fit_head(model: nn.Module, task: Task, train: Any, device: torch.device, head: str = "head") -> None:
    """Fit the module ``head`` of ``model`` to the optimum of the task's objective with the
    features (the head's inputs) fixed, in place.

    For a linear head and cross-entropy plus L2 the objective is convex in the head. The features
    are computed once (:class:`~influencer.heads.Head`), so L-BFGS works on the head alone with
    the same optimum (the other layers' weight decay is constant in the head): each of its few
    hundred steps on this ill-conditioned problem is then a cheap matrix product instead of a
    pass through the network. Computed in float64; ``model`` must already be float64.
    """
    part = Head(model, task, head)
    features = part.features(train, device=device, dtype=torch.float64, batch_size=1024)
    fn = ModelFunction(part.model, part.task, None, device, torch.float64)
    try:
        theta = fit_lbfgs(fn, features)
    except ConvergenceError as exc:  # the Adam solution is still a fine model to explain
        log.warning("model: the head did not reach the optimum (%s); keeping the Adam weights", exc)
        return
    shift = float((theta - fn.theta0).norm() / fn.theta0.norm().clamp_min(1e-30))
    fn.load_into(theta)
    log.info("model: head fitted to the optimum (relative change %.2g)", shift)


# ---- influence over a head, on cached features ----------------------------------------------------


def chosen_head(config: ExplainConfig, job: Job) -> str | None:
    """The head influence is computed over: the settings' ``head``, else the job's unless the
    settings choose ``params``."""
    if config.head is not None:
        return config.head
    return job.head if config.params is None else None


def influence_job(job: Job, config: ExplainConfig, store: RunStore, device: torch.device) -> Job:
    """The job influence is computed on: ``job`` itself, or, with a head (:func:`chosen_head`),
    the head as the model and the network's features (cached) as the data.

    Everything but the report (which shows ``job``'s own examples) then runs on the head: the
    evaluation, the curvature, the gradients.
    """
    name = chosen_head(config, job)
    if name is None:
        return job
    head = Head(job.model, job.task, name)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    train, test = head_features(head, job, store, device, dtype, config.batch_size, config.progress)
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


def head_features(
    head: Head,
    job: Job,
    store: RunStore,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    progress: bool,
) -> tuple[FeatureExamples, FeatureExamples]:
    """The training and test data with the head's features, from the run directory's cache or
    computed (one pass of the network over each set) and cached.

    The cache is keyed by the model's fingerprint (code and weights), the data, the task, the head
    and the dtype; any change recomputes the features.
    """
    model = fingerprint_of(job.model)
    settings = {
        "head": head.name,
        "dtype": str(dtype).removeprefix("torch."),
        "task": task_fingerprint(job.task),
    }
    components = {
        "model weights": str(model["state"]),
        "model code": hash_json(model["classes"]),
        "data": hash_json([hash_examples(job.train), hash_examples(job.test)]),
        "settings": hash_json(settings),
    }
    section = store.section("features", components, {"head": head.name, "dtype": settings["dtype"]})
    out = []
    for which, data in (("train", job.train), ("test", job.test)):
        cached = section.load(which) if which in section else None
        if cached is not None and len(cached) == len(data):
            features = torch.from_numpy(cached)
        else:
            start = time.perf_counter()
            features = head.extract(
                data, device=device, dtype=dtype, batch_size=batch_size, progress=progress
            )
            section.save(which, features)
            log.info(
                "features: the network ran once over the %d %s examples up to %r (%.1f s); influence "
                "runs on the head alone",
                len(data),
                "training" if which == "train" else "test",
                head.name,
                time.perf_counter() - start,
            )
        out.append(head.examples(features, data))
    return out[0], out[1]


def fingerprint_of(model: nn.Module) -> dict[str, Any]:
    """:func:`~influencer._kernel.fingerprint.model_fingerprint` of a module's own state."""
    return model_fingerprint(model, dict(model.state_dict()))


def labels_of(batch: Any) -> torch.Tensor | None:
    """The label tensor ``(B,)`` of a batch, when it has one: ``batch[1]`` or a ``label``-like key
    (for a batch of head features: of the examples' own batch)."""
    batch = original_batch(batch)
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


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
