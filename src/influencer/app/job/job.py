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
``display`` (:mod:`influencer.app.report.display`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from influencer import Task
from influencer.app.report.display import Display, as_display, choose_display
from influencer.data import as_examples
from influencer.errors import ConfigError, InfluencerError, TaskError
from influencer.heads import Head, original_batch
from influencer.retraining import Retrainer

__all__ = ["Job", "JobError", "as_job", "check_build_function", "labels_of", "load_job"]

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
        display: how the report shows an example: a :class:`~influencer.app.report.display.Display`
            (``TextDisplay(tokenizer)``, ``TableDisplay(names, importance=...)``, ...) or a
            function ``batch -> list[str]`` of texts; default: chosen from the data
            (:func:`~influencer.app.report.display.choose_display`).
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
        """The job's display, or the one :func:`~influencer.app.report.display.choose_display` picks."""
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
        f"influencer.app.job.job.Job; got {type(result).__name__}"
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
        raise _import_failed(spec, exc) from exc
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else "its source"
        raise JobError(
            f"cannot import {module_name!r} (from --task {spec}): syntax error in {where}: {exc.msg}"
        ) from exc
    except Exception as exc:
        raise _import_failed(spec, exc) from exc
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


def _import_failed(spec: str, exc: BaseException) -> JobError:
    log.debug("importing %s raised:", spec, exc_info=True)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return JobError(
        f"importing the module of --task {spec} raised {type(exc).__name__}"
        + (f": {first}" if first else "")
        + " (the traceback is in the run's log)"
    )


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
