"""Influence of *perturbing* a training input on a test prediction (Koh & Liang 2017, Sec. 2.2).

Moving training example ``z_i = (x_i, y_i)`` to ``(x_i + delta, y_i)`` and retraining changes the
parameters by ``-(1/n) H^-1 grad_x grad_theta loss(z_i) delta`` to first order (this is exact as a
derivative: ``theta*(x_i)`` is a smooth function of the training input at a strict minimum). Dotting
with ``grad f(z_test)`` gives three views of one quantity, with ``s_test = H^-1 grad f(z_test)``::

    mixed_j,i    = grad_x [ s_test_j . grad_theta loss(x_i, y_i) ]             # shape of x_i
    I_pert,loss  = -mixed                          (the paper's quantity, unscaled)
    effect       = -mixed / n = I_pert,loss / n    (d f(z_test) / d x_i: predicted change of the
                                                    test measurement per unit change of x_i)

and, relative to the removal scores of :mod:`influencer._kernel.scores` (``score_i = s_test . g_i / n``),
``effect = -grad_{x_i} score_i``: raising a pixel in the direction of ``effect`` raises the test loss,
and makes the training point *less helpful* by the same amount. The regulariser does not depend on
the inputs, so ``g_i`` and ``grad loss_i`` give the same ``mixed``.

``mixed`` is computed for every (test direction, training example) pair at once with ``torch.func``:
``jvp`` over ``theta`` of ``grad_x loss`` (forward-over-reverse, like an HVP), ``vmap``-ed over the
examples of a chunk and over the test directions; training data streams in chunks.

Feature attribution splits a training point's score over its input features: ``gradient x input``
``(x_i - baseline) * grad_x score_i`` is the first-order share of ``score_i`` carried by each feature
(it sums to ``score_i(x_i) - score_i(baseline)`` for a locally linear score).

``reproductions.perturbation.check_perturbation`` checks these predictions against
retraining with moved inputs (:class:`PatchedExamples`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap
from torch.utils._pytree import tree_map

from influencer._kernel.data import Examples
from influencer._kernel.errors import ConfigError, DataError, NonFiniteError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar
from influencer._kernel.task import Batch
from influencer.influence import Influence

# Where the differentiated input sits in a batch: an index (tuple/list batches), a key (dict
# batches) or a path of them for nested batches. Built-in tasks take (inputs, labels): input=0.
InputPath = int | str | tuple[int | str, ...]


def _as_path(input: InputPath) -> tuple[int | str, ...]:
    path = input if isinstance(input, tuple) else (input,)
    if not path or not all(isinstance(k, (int, str)) for k in path):
        raise ConfigError(f"input must be an index, a key or a tuple of them, got {input!r}")
    return path


def get_input(batch: Batch, input: InputPath = 0) -> Tensor:
    """The input leaf of ``batch`` at ``input`` (``batch[0]`` for ``(inputs, labels)`` batches)."""
    node = batch
    for key in _as_path(input):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(
                f"cannot find the input at {input!r} in a batch of type {type(batch).__name__}: pass "
                "input=<index or key> naming the tensor the model reads (default 0, for (inputs, labels))"
            ) from exc
    if not isinstance(node, Tensor):
        raise DataError(f"the batch entry at {input!r} is a {type(node).__name__}, not a tensor")
    return node


def replace_input(batch: Batch, input: InputPath, value: Tensor) -> Batch:
    """A copy of ``batch`` whose input leaf at ``input`` is ``value`` (other leaves shared)."""
    path = _as_path(input)

    def put(node: Any, depth: int) -> Any:
        if depth == len(path):
            return value
        key = path[depth]
        if isinstance(node, Mapping):
            return {**node, key: put(node[key], depth + 1)}
        if isinstance(node, (tuple, list)):
            items = list(node)
            items[key] = put(items[key], depth + 1)  # type: ignore[index]
            if hasattr(node, "_make"):  # namedtuple
                return node._make(items)  # type: ignore[union-attr]
            return type(node)(items)
        raise DataError(f"cannot replace the input at {input!r} in a {type(node).__name__}")

    return put(batch, 0)


def check_input(x: Tensor, input: InputPath = 0) -> None:
    """Raise :class:`DataError` unless ``x`` is a floating tensor that can be differentiated."""
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        raise DataError(
            f"the input at {input!r} has dtype {x.dtype}: I_pert differentiates the loss with respect to "
            "the training input, which needs floating values. Integer images (e.g. uint8 pixels) must "
            "be converted to float before training (x.float() / 255); discrete inputs such as token ids "
            "or categories have no input gradient: perturb a continuous representation instead (e.g. "
            "feed embeddings as the input). If the input is another leaf of the batch, pass input=..."
        )
    if x.is_complex():
        raise DataError(f"the input at {input!r} is complex ({x.dtype}); I_pert needs real floating inputs")


def _unsqueeze(example: Batch) -> Batch:
    return tree_map(lambda a: a.unsqueeze(0) if isinstance(a, Tensor) else a, example)


def input_gradients(fn: ModelFunction, theta: Tensor, batch: Batch, input: InputPath = 0) -> Tensor:
    """Per-example ``grad_x loss(x_i)`` ``(B, *x)`` at ``theta`` (used to check differentiability)."""
    path = _as_path(input)
    x = get_input(batch, path)
    check_input(x, input)

    def loss_of(xi: Tensor, example: Batch) -> Tensor:
        return fn.loss(theta, _unsqueeze(replace_input(example, path, xi))).sum()

    return vmap(grad(loss_of), in_dims=(0, 0))(x, batch)


def mixed_gradients(
    fn: ModelFunction, theta: Tensor, batch: Batch, directions: Tensor, input: InputPath = 0
) -> Tensor:
    """``grad_{x_i} [s_j . grad_theta loss(z_i)]`` for directions ``s`` ``(m, p)``: ``(m, B, *x)``.

    Forward-over-reverse: the reverse pass gives ``grad_x loss`` and a ``jvp`` in ``theta`` along
    ``s_j`` differentiates it, which equals the mixed derivative by symmetry of second derivatives.
    ``vmap`` runs it for every example of the batch and every direction at once.
    """
    path = _as_path(input)
    x = get_input(batch, path)
    check_input(x, input)
    s = directions.reshape(-1, fn.p).to(theta)

    def grad_x(t: Tensor, xi: Tensor, example: Batch) -> Tensor:
        def loss_of(x1: Tensor) -> Tensor:
            return fn.loss(t, _unsqueeze(replace_input(example, path, x1))).sum()

        return grad(loss_of)(xi)

    def one(xi: Tensor, example: Batch, sj: Tensor) -> Tensor:
        return jvp(lambda t: grad_x(t, xi, example), (theta,), (sj,))[1]

    over_examples = vmap(one, in_dims=(0, 0, None))
    return vmap(over_examples, in_dims=(None, None, 0))(x, batch, s)


def top_features(attributions: Tensor, k: int, feature_dims: int = 1) -> tuple[Tensor, Tensor]:
    """The ``k`` features of largest ``|attribution|``, over the last ``feature_dims`` dimensions.

    Returns ``(ids, values)``, each ``(..., k)``: flat feature indices ordered by decreasing
    magnitude, and the signed attributions at them.
    """
    flat = attributions.reshape(*attributions.shape[: attributions.ndim - feature_dims], -1)
    k = min(k, flat.shape[-1])
    if k < 1:
        raise ConfigError("top_features needs k >= 1")
    ids = flat.abs().topk(k, dim=-1).indices
    return ids, flat.gather(-1, ids)


def feature_rank(attributions: Tensor, feature: int, feature_dims: int = 1) -> Tensor:
    """1-based rank of flat feature index ``feature`` by ``|attribution|`` (1 = the largest), ``(...)``."""
    flat = attributions.reshape(*attributions.shape[: attributions.ndim - feature_dims], -1).abs()
    if not 0 <= feature < flat.shape[-1]:
        raise ConfigError(f"feature must lie in [0, {flat.shape[-1]}), got {feature}")
    return 1 + (flat > flat[..., feature : feature + 1]).sum(-1)


@dataclass(frozen=True)
class FeatureAttribution:
    """How each input feature of a training point carries its influence on each test point.

    ``score_gradient`` is ``grad_{x_i} score(z_test_j, z_i)`` ``(m, c, *x)`` in the units of
    :mod:`influencer._kernel.scores` (= ``-effect``; see this module's docstring).
    """

    train_ids: Tensor  # (c,)
    inputs: Tensor  # (c, *x)
    score_gradient: Tensor  # (m, c, *x)
    baseline: Tensor  # broadcastable to (c, *x)
    feature_names: tuple[str, ...] = ()

    @property
    def gradient_x_input(self) -> Tensor:
        """``(x_i - baseline) * grad_x score_i`` ``(m, c, *x)``: each feature's share of the score."""
        return self.score_gradient * (self.inputs - self.baseline)

    def values(self, by: Literal["gradient_x_input", "gradient"] = "gradient_x_input") -> Tensor:
        if by == "gradient_x_input":
            return self.gradient_x_input
        if by == "gradient":
            return self.score_gradient
        raise ConfigError(f"by must be 'gradient_x_input' or 'gradient', got {by!r}")

    def top(
        self, k: int, by: Literal["gradient_x_input", "gradient"] = "gradient_x_input"
    ) -> tuple[Tensor, Tensor]:
        """Top ``k`` features per (test, training point): flat ids and values, each ``(m, c, k)``."""
        return top_features(self.values(by), k, self.inputs.ndim - 1)

    def rank(self, feature: int, by: Literal["gradient_x_input", "gradient"] = "gradient_x_input") -> Tensor:
        """1-based rank ``(m, c)`` of flat feature ``feature`` by magnitude."""
        return feature_rank(self.values(by), feature, self.inputs.ndim - 1)

    def names(self, ids: Tensor) -> list:
        """Feature names for flat ids (nested like ``ids``); the ids themselves without names."""
        if not self.feature_names:
            return ids.tolist()
        return tree_map(lambda i: self.feature_names[i], ids.tolist())


class PerturbationInfluence:
    """``I_pert,loss`` and per-input effects for all training points, over a fitted :class:`Influence`.

    Args:
        influence: a fitted :class:`Influence` (its curvature, estimator and sign convention are used).
        input: where the differentiated input sits in a training batch (default ``0``: ``batch[0]``
            for ``(inputs, labels)`` batches; a key for dict batches; a tuple path for nested ones).
        batch_size: training examples per chunk (default: the influence's ``batch_size``). Memory
            per chunk grows as ``m * batch_size`` forward-mode activations.
    """

    def __init__(self, influence: Influence, input: InputPath = 0, batch_size: int | None = None) -> None:
        if not isinstance(influence, Influence):
            raise ConfigError(f"influence must be an influencer.Influence, got {type(influence).__name__}")
        self.influence = influence
        self.input = _as_path(input)
        self.batch_size = batch_size or influence.batch_size
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self._check_differentiable()

    @property
    def fn(self) -> ModelFunction:
        return self.influence.fn

    @property
    def train(self) -> Examples:
        return self.influence.train

    @property
    def n(self) -> int:
        return self.influence.n

    def _check_differentiable(self) -> None:
        # A model that rounds, indexes or ignores the input has an identically zero input gradient;
        # I_pert would then be silently zero everywhere.
        first = self.fn.prepare(self.train.take(torch.arange(min(8, self.n))))
        g = input_gradients(self.fn, self.influence.theta, first, self.input)
        if not torch.isfinite(g).all():
            raise NonFiniteError("the training loss's gradient with respect to the input is not finite")
        if not g.any():
            raise DataError(
                f"the training loss has a zero gradient with respect to the input at {self.input!r} on "
                "every one of the first examples: the model uses that input discretely (rounding, "
                "indexing, an embedding lookup) or not at all, so I_pert is not defined. Pass input=... "
                "naming the continuous input the model reads"
            )

    def inputs(self, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """The training inputs ``(c, *x)`` at ``train_indices`` (default all), prepared for the model."""
        idx = self.train.check_indices(train_indices)
        parts = [
            get_input(self.fn.prepare(b), self.input) for _, b in self.train.chunks(self.batch_size, idx)
        ]
        return torch.cat(parts)

    def mixed_chunks(
        self, directions: Tensor, train_indices: Sequence[int] | Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(ids, M)`` chunks, ``M[j, i] = grad_{x_i} (s_j . g_i)`` ``(m, c, *x)``."""
        idx = self.train.check_indices(train_indices)
        s = directions.reshape(-1, self.influence.p).to(self.influence.theta)
        total = -(-len(idx) // self.batch_size)
        chunks = self.train.chunks(self.batch_size, idx)
        for ids, batch in progress_bar(chunks, "I_pert", self.influence.progress, total=total, unit="batch"):
            m = mixed_gradients(self.fn, self.influence.theta, self.fn.prepare(batch), s, self.input)
            if not torch.isfinite(m).all():
                raise NonFiniteError(
                    f"I_pert is NaN or infinite for training example(s) among {ids[:10].tolist()}: check "
                    "those inputs and the model's second derivatives (use float64 if it overflows)"
                )
            yield ids, m

    def _mixed(self, directions: Tensor, train_indices: Sequence[int] | Tensor | None) -> Tensor:
        return torch.cat([m for _, m in self.mixed_chunks(directions, train_indices)], dim=1)

    def effects_from_directions(
        self, directions: Tensor, train_indices: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """``d f(z_test_j) / d x_i`` ``(m, c, *x)`` from precomputed ``s_test`` directions ``(m, p)``."""
        return -self._mixed(directions, train_indices) / self.n

    def effects(self, test: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Predicted change of each test measurement per unit change of each training input, ``(m, c, *x)``.

        ``f(test)`` rises by about ``(effect * delta).sum()`` when ``x_i`` moves by ``delta`` and the
        model is retrained. Equals ``I_pert,loss / n`` and ``-grad_{x_i} score_i``.
        """
        return self.effects_from_directions(self.influence.test_directions(test), train_indices)

    def influence_pert_loss(self, test: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """The paper's ``I_pert,loss`` ``(m, c, *x)`` = ``-grad_x grad f(test)^T H^-1 g_i`` (unscaled)."""
        return -self._mixed(self.influence.test_directions(test), train_indices)

    def attribution(
        self,
        test: Any,
        train_indices: Sequence[int] | Tensor | None = None,
        baseline: Tensor | float = 0.0,
        feature_names: Sequence[str] = (),
    ) -> FeatureAttribution:
        """Which input features of each training point carry its score on each test point.

        ``baseline`` is the reference input (0: for standardised features, the average example).
        """
        return self.attribution_from_directions(
            self.influence.test_directions(test), train_indices, baseline, feature_names
        )

    def attribution_from_directions(
        self,
        directions: Tensor,
        train_indices: Sequence[int] | Tensor | None = None,
        baseline: Tensor | float = 0.0,
        feature_names: Sequence[str] = (),
    ) -> FeatureAttribution:
        """:meth:`attribution` from precomputed ``s_test`` directions ``(m, p)``."""
        idx = self.train.check_indices(train_indices)
        score_gradient = self._mixed(directions, idx) / self.n
        x = self.inputs(idx)
        base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
        return FeatureAttribution(idx, x, score_gradient, base, tuple(feature_names))


class PatchedExamples(Examples):
    """``data`` with the inputs of a few examples replaced (e.g. perturbed or poisoned copies).

    ``take`` reads the base batch and swaps in the new rows, so any form of data works and
    nothing is copied but the replaced inputs ``(k, *x)``.
    """

    def __init__(
        self, data: Examples, ids: Sequence[int] | Tensor, inputs: Tensor, input: InputPath = 0
    ) -> None:
        self.base = data
        self.path = _as_path(input)
        idx = data.check_indices(ids)
        if idx.unique().numel() != idx.numel():
            raise DataError("each replaced example id must appear once")
        if inputs.shape[0] != idx.numel():
            raise DataError(f"got {inputs.shape[0]} replacement inputs for {idx.numel()} ids")
        self.ids = idx
        self.inputs = inputs.detach()
        self.position = torch.full((len(data),), -1, dtype=torch.int64)
        self.position[idx] = torch.arange(idx.numel())

    def __len__(self) -> int:
        return len(self.base)

    def take(self, indices: Tensor) -> Batch:
        batch = self.base.take(indices)
        pos = self.position[indices.cpu()]
        hit = pos >= 0
        if not hit.any():
            return batch
        x = get_input(batch, self.path).clone()
        x[hit.to(x.device)] = self.inputs[pos[hit].to(self.inputs.device)].to(x)
        return replace_input(batch, self.path, x)
