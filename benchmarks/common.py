"""Shared pieces of the benchmarks: the problems, their training, metrics, timing and tables.

A :class:`Problem` is a model + data set trained to a (local) optimum of
``J(theta) = mean_i CE_i(theta) + weight_decay / 2 * ||theta||^2`` in float64 with L-BFGS, so that
every influence method (ours and the peers') differentiates the very same objective at the very
same parameters. Reference scores are our ``Exact`` estimator in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib
import json
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from influencer import ClassificationTask
from influencer._kernel.functional import ModelFunction
from influencer._kernel.stats import pearson, spearman
from influencer.data import as_examples
from influencer.datasets import load_digits
from influencer.models import MLP, LogisticRegression
from influencer.training import fit_lbfgs


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """Which model and data: ``hidden=()`` is multinomial logistic regression.

    ``dataset``: ``"digits"`` (scikit-learn's 8x8 images), ``"mnist1d"`` (MNIST-1D, generated
    locally with ``mnist1d_samples`` signals of length 40) or ``"synthetic"`` (``features``
    Gaussian inputs labelled by a random teacher network, ``n_train`` + ``n_test`` of them: the
    large problems). ``n_test`` beyond a data set's test split takes the extra test points from
    the start of the training split.

    ``adam_epochs``: epochs of Adam before the polish; ``polish``: L-BFGS to ``grad J ~ 1e-10``
    (the small problems). Without it (the large problems, where it would take longer than every
    race) the model is made stationary exactly instead: the task's regulariser gains the linear
    term ``-r . theta`` with ``r = grad J`` at the trained parameters, which adds no curvature and
    leaves every peer's mapping (``peers.py``) exact.
    """

    name: str
    hidden: tuple[int, ...] = ()
    dataset: str = "digits"  # "digits", "mnist1d" or "synthetic" (see load_split)
    weight_decay: float = 1e-3
    n_train: int | None = None  # None: the whole training split
    n_test: int = 10
    seed: int = 0
    mnist1d_samples: int = 2000
    features: int = 0  # synthetic inputs' width
    adam_epochs: int = 60
    polish: bool = True

    def __post_init__(self) -> None:
        if self.weight_decay <= 0:
            raise ValueError("weight_decay must be > 0 so the optimum is unique and well posed")
        if self.n_test < 1 or (self.n_train is not None and self.n_train < 2):
            raise ValueError("need n_test >= 1 and n_train >= 2")


@dataclasses.dataclass
class Problem:
    """A trained float64 model with its data, on ``device``."""

    spec: ProblemSpec
    model: nn.Module
    task: ClassificationTask
    x_train: Tensor  # (n, d): d = 64 for digits, 40 for MNIST-1D
    y_train: Tensor  # (n,)
    x_test: Tensor  # (m, d)
    y_test: Tensor  # (m,)
    device: torch.device
    train_seconds: float
    # Other models of the same architecture trained on the same data (other seeds): libraries that
    # ensemble over checkpoints (dattri's influence functions, captum's TracInCP) average over
    # (model, *members); the others use the model alone.
    members: tuple[nn.Module, ...] = ()

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def p(self) -> int:
        return sum(q.numel() for q in self.model.parameters())

    @property
    def weight_decay(self) -> float:
        return self.spec.weight_decay

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fresh_model(self) -> nn.Module:
        """An independent copy, so no library can disturb the weights another one sees."""
        return copy.deepcopy(self.model)

    def astype(self, dtype: torch.dtype) -> Problem:
        """The same problem with model and inputs cast to ``dtype`` (labels unchanged)."""
        if dtype == self.dtype:
            return self
        return dataclasses.replace(
            self,
            model=copy.deepcopy(self.model).to(dtype),
            x_train=self.x_train.to(dtype),
            x_test=self.x_test.to(dtype),
        )


def build_model(spec: ProblemSpec, num_features: int, num_classes: int) -> nn.Module:
    if spec.hidden:
        return MLP(num_features, spec.hidden, num_classes)
    return LogisticRegression(num_features, num_classes)


NUM_CLASSES = 10


def synthetic_data(n: int, m: int, d: int, seed: int, device: torch.device) -> tuple[tuple, tuple]:
    """Gaussian inputs ``(n + m, d)``; labels = argmax of a random tanh teacher + 10% label noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, d, generator=gen)
    w1 = torch.randn(d, 64, generator=gen) / d**0.5
    w2 = torch.randn(64, NUM_CLASSES, generator=gen) / 8
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n + m, generator=gen) < 0.1
    y[flip] = torch.randint(0, NUM_CLASSES, (int(flip.sum()),), generator=gen)
    x, y = x.to(device), y.to(device)
    return (x[:n], y[:n]), (x[n:], y[n:])


class StationaryTask(ClassificationTask):
    """Cross-entropy + ``weight_decay / 2 ||theta||^2 - r . theta``: the linear term makes given
    parameters an exact stationary point (``r`` = the gradient of the rest there) and has no
    curvature, so the L2 fast paths still hold (``regularizer_curvature`` = ``weight_decay``)."""

    def __init__(self, weight_decay: float, shift: dict[str, Tensor]) -> None:
        super().__init__(weight_decay=weight_decay)
        self.shift = shift

    def regularizer(self, params):
        linear = sum((self.shift[name] * value).sum() for name, value in params.items())
        return super().regularizer(params) - linear

    def regularizer_curvature(self) -> float | None:
        return self.weight_decay

    def settings(self) -> dict[str, Any]:
        norm = float(sum(r.pow(2).sum() for r in self.shift.values()) ** 0.5)
        return {**super().settings(), "shift_norm": norm}


def load_split(spec: ProblemSpec):
    """Digits (scikit-learn's bundled 8x8 images, 1,348 training points) or MNIST-1D.

    MNIST-1D (Greydanus 2020) is generated procedurally by ``mnist1d``'s ``make_dataset`` (never its
    downloader): 2,000 signals of length 40, 1,600 for training.
    """
    if spec.dataset == "digits":
        return load_digits(dtype=torch.float64, seed=spec.seed)
    if spec.dataset == "mnist1d":
        from influencer.datasets import load_mnist1d

        return load_mnist1d(spec.mnist1d_samples, seed=spec.seed, dtype=torch.float64)
    raise ValueError(f"unknown data set {spec.dataset!r}; choose digits or mnist1d")


def make_problem(spec: ProblemSpec, device: torch.device | str = "cpu") -> Problem:
    """The spec's data set and model, trained to ``grad J ~ 0`` in float64."""
    device = torch.device(device)
    if spec.dataset == "synthetic":
        if spec.n_train is None or spec.features < 1:
            raise ValueError("a synthetic problem needs n_train and features")
        (x_train, y_train), (x_test, y_test) = synthetic_data(
            spec.n_train, spec.n_test, spec.features, spec.seed, torch.device("cpu")
        )
        x_train, x_test, num_classes = x_train.double(), x_test.double(), NUM_CLASSES
    else:
        split = load_split(spec)
        x_train, y_train = split.x_train, split.y_train
        if spec.n_train is not None:
            x_train, y_train = x_train[: spec.n_train], y_train[: spec.n_train]
        x_test, y_test = split.x_test[: spec.n_test], split.y_test[: spec.n_test]
        extra = spec.n_test - len(x_test)  # more test points than the split has: training points
        x_test, y_test = torch.cat([x_test, x_train[:extra]]), torch.cat([y_test, y_train[:extra]])
        num_classes = split.num_classes
    torch.manual_seed(spec.seed)
    model = build_model(spec, x_train.shape[1], num_classes).to(device, torch.float64)
    task = ClassificationTask(weight_decay=spec.weight_decay)
    fn = ModelFunction(model, task)
    start = time.perf_counter()
    # A network is first brought near a minimum by Adam: L-BFGS from the initialisation alone can
    # stall on a plateau. The polish to a stationary point is what makes influence well defined.
    if spec.hidden:
        from influencer.training import train_minibatch

        options = {"lr": 1e-2, "batch_size": 64 if spec.polish else 128, "seed": spec.seed}
        train_minibatch(model, task, (x_train, y_train), epochs=spec.adam_epochs, **options)
        fn = ModelFunction(model, task)
    data = as_examples((x_train.to(device), y_train.to(device)))
    if spec.polish:
        theta = fit_lbfgs(fn, data, grad_tol=1e-10)
        fn.load_into(theta)
    else:
        theta = fn.theta0
        residual = torch.zeros_like(theta)
        for _, chunk in data.chunks(4096):
            batch = fn.prepare(chunk)
            residual += torch.func.grad(lambda t, b=batch: fn.loss(t, b).sum())(theta)
        residual = residual / len(data) + fn.regularizer_grad(theta)  # grad J (p,)
        task = StationaryTask(spec.weight_decay, {k: v.detach() for k, v in fn.unflatten(residual).items()})
    model.eval()
    seconds = time.perf_counter() - start
    move = {"device": device}
    return Problem(
        spec,
        model,
        task,
        x_train.to(**move),
        y_train.to(**move),
        x_test.to(**move),
        y_test.to(**move),
        device,
        seconds,
    )


# ---- timing --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device) -> Iterator[dict[str, float]]:
    """``with stopwatch(dev) as t: ...`` then ``t["seconds"]``; waits for queued GPU work."""
    out: dict[str, float] = {}
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    try:
        yield out
    finally:
        synchronize(device)
        out["seconds"] = time.perf_counter() - start


# ---- metrics -------------------------------------------------------------------------------------


def agreement(scores: Tensor, reference: Tensor) -> dict[str, float]:
    """Pearson, Spearman (over all ``m x n`` pairs) and relative error ``||s - ref|| / ||ref||``."""
    a = scores.detach().double().cpu().numpy().reshape(-1)
    b = reference.detach().double().cpu().numpy().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"scores have {a.size} entries, the reference {b.size}")
    if not np.isfinite(a).all():
        return {"pearson": float("nan"), "spearman": float("nan"), "rel_err": float("nan")}
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return {"pearson": pearson(a, b), "spearman": spearman(a, b), "rel_err": rel}


# ---- environment ---------------------------------------------------------------------------------


def versions(packages: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # Importable without being installed (e.g. from a source tree on PYTHONPATH)?
            try:
                out[name] = getattr(importlib.import_module(name.lower()), "__version__", "unknown")
            except ImportError:
                out[name] = "not installed"
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- tables --------------------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str], align: str | None = None) -> str:
    """Fixed-width text table; ``align`` is one of ``l``/``r`` per column (default: text left)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "".join(
        "l" if not rows or isinstance(rows[0][i], str) else "r" for i in range(len(header))
    )

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
