"""Real data sets that ship with scikit-learn or are generated offline, split and scaled.

Every loader returns a :class:`Split` of tensors with a fixed, seeded train/test split, so
experiments and tests are reproducible without any download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer._kernel.extras import require


@dataclass(frozen=True)
class Split:
    """A train/test split. Inputs ``(n, ...)`` floating, labels ``(n,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
    feature_names: tuple[str, ...] = ()

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    dtype: torch.dtype | None,
    classes: tuple[str, ...],
    feature_names: tuple[str, ...] = (),
    standardize: bool | np.ndarray = False,
) -> Split:
    """Seeded train/test split of ``x`` ``(n, ...)`` and ``y`` ``(n,)``.

    ``standardize``: ``True`` scales every feature to zero mean and unit variance on the training
    part; a boolean mask over the features scales only those it marks (e.g. not a 0/1 indicator).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    x = x.astype(np.float64)
    if standardize is not False:  # statistics of the training part only
        mean, std = x[train].mean(0), x[train].std(0)
        scaled = (x - mean) / np.where(std > 0, std, 1.0)
        x = scaled if standardize is True else np.where(np.asarray(standardize, dtype=bool), scaled, x)
    dt = dtype or torch.get_default_dtype()

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dt)

    def lab(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.int64)

    return Split(name, t(x[train]), lab(y[train]), t(x[test]), lab(y[test]), classes, feature_names)


def load_digits(
    test_fraction: float = 0.25, seed: int = 0, images: bool = False, dtype: torch.dtype | None = None
) -> Split:
    """scikit-learn's 1,797 handwritten digits, pixels scaled to [0, 1].

    ``images=True`` gives ``(n, 1, 8, 8)`` for CNNs; otherwise flat ``(n, 64)``.
    """
    d = require("sklearn.datasets", "influencer.datasets.load_digits", "data").load_digits()
    x = d.data / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return split_arrays("digits", x, d.target, test_fraction, seed, dtype, tuple(str(c) for c in range(10)))


def load_tabular(
    name: str, test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype | None = None
) -> Split:
    """``breast_cancer``, ``wine`` or ``iris`` from scikit-learn, standardised on the training part."""
    datasets = require("sklearn.datasets", "influencer.datasets.load_tabular", "data")

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(loaders)}")
    d = loaders[name]()
    return split_arrays(
        name,
        d.data,
        d.target,
        test_fraction,
        seed,
        dtype,
        tuple(str(c) for c in d.target_names),
        tuple(str(f) for f in d.feature_names),
        standardize=True,
    )


def load_dataset(name: str, dtype: torch.dtype | None = None, mnist1d_samples: int = 2000) -> Split:
    """A data set by name: ``digits``, ``mnist1d`` (``mnist1d_samples`` signals) or a tabular one."""
    if name == "digits":
        return load_digits(dtype=dtype)
    if name == "mnist1d":
        return load_mnist1d(mnist1d_samples, dtype=dtype)
    return load_tabular(name, dtype=dtype)


def load_mnist1d(
    num_samples: int = 4000, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype | None = None
) -> Split:
    """MNIST-1D (Greydanus 2020), generated procedurally (no download): ``(n, 40)`` signals, 10 classes."""
    data = require("mnist1d.data", "influencer.datasets.load_mnist1d")
    get_dataset_args, make_dataset = data.get_dataset_args, data.make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]])
    y = np.concatenate([d["y"], d["y_test"]])
    return split_arrays("mnist1d", x, y, test_fraction, seed, dtype, tuple(str(c) for c in range(10)))
