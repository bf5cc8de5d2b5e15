"""The influence engine: training examples' influence on a model's test predictions.

Usage::

    inf = Influence(model, ClassificationTask(weight_decay=1e-3), train=(X, y), estimator=CG(damping=1e-3))
    inf.fit()                                # curvature + inverse-Hessian estimator
    s = inf.scores((X_test, y_test))         # (m, n); positive = helpful (see influencer._kernel.scores)
    top = top_k(s, k=5)                      # most helpful / harmful training ids per test example

Scores are computed the efficient way round: one inverse-HVP per *test* example
(``s_test = H^-1 grad f(test)``), then a stream of training-gradient chunks, each ``(c, p)``,
dotted with ``s_test``. The ``n x p`` gradient matrix is never held in memory. When every chosen
parameter is in an ``nn.Linear``/``nn.Conv2d`` layer (whatever the estimator) not even the chunks
are: each layer's part of ``s_test . g_i`` is contracted from the layer's inputs and output
gradients (:mod:`influencer.estimators.layer_scores`). The
regulariser's gradient, shared by every ``g_i``, enters the scores once as a shift.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.curvature import Curvature, CurvatureKind
from influencer._kernel.data import Examples, as_examples
from influencer._kernel.distributed import all_gather_blocks, all_reduce_sum, shard
from influencer._kernel.errors import ConfigError, DataError, NonFiniteError
from influencer._kernel.files import (
    atomic_write_bytes,
    atomic_write_json,
    describe_changes,
    flatten,
    json_roundtrip,
)
from influencer._kernel.fingerprint import hash_examples, hash_json, model_fingerprint, task_fingerprint
from influencer._kernel.functional import HVPMode, ModelFunction, check_hvp_mode
from influencer._kernel.layers import Layer, find_layers
from influencer._kernel.progress import progress_bar
from influencer._kernel.scores import removal_scores, up_loss_from_scores
from influencer._kernel.task import Task
from influencer.estimators import Estimator, Solver
from influencer.estimators.auto import Choice, choose_estimator
from influencer.estimators.kronecker import KroneckerSolver
from influencer.estimators.layer_scores import LayerRows, LayerScorer, capture_rows

_KEEP: Any = object()  # replace(): keep this setting as it is
log = logging.getLogger(__name__)


# Per-example gradients are computed in (B, p) blocks of about this size by default.
GRADIENT_BLOCK_BYTES = 256 * 2**20


def default_batch_size(p: int, dtype: torch.dtype) -> int:
    """Examples per gradient chunk: a ``GRADIENT_BLOCK_BYTES`` block of ``(B, p)``, 128 to 4,096."""
    return _rows_in_block(p, dtype, 128)


def default_solve_batch(p: int, dtype: torch.dtype) -> int:
    """Right-hand sides per solve: a ``GRADIENT_BLOCK_BYTES`` block of ``(k, p)``, 256 to 4,096.

    Block CG over more columns needs fewer passes over the data (once the columns outnumber the
    parameters, one), so a small model's test points are solved together.
    """
    return _rows_in_block(p, dtype, 256)


def _rows_in_block(p: int, dtype: torch.dtype, least: int) -> int:
    """Rows of ``p`` values that fill ``GRADIENT_BLOCK_BYTES``, between ``least`` and 4,096."""
    return int(min(4096, max(least, GRADIENT_BLOCK_BYTES // max(p * dtype.itemsize, 1))))


class Influence:
    """Influence functions for ``model`` trained with ``task`` on ``train``.

    Args:
        model: the trained ``nn.Module`` (put in eval mode; its weights are never modified).
        task: per-example loss, measurement and regulariser (:mod:`influencer._kernel.task`).
        train: the training data, in any form :func:`influencer._kernel.data.as_examples` accepts, in the
            order that defines training ids.
        estimator: inverse-Hessian method (default: chosen by :func:`influencer.choose_estimator`
            from the model's size and layers, e.g. :class:`Exact` undamped for a small convex model,
            EK-FAC with Gauss-Newton curvature for a network; the choice and its reason are in
            :attr:`choice`, :meth:`settings` and the ``influencer`` log).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (positive semi-definite for non-convex nets);
            default the Hessian, or the default estimator's choice.
        params: parameter names or module prefixes to compute influence over (default: every
            parameter that requires grad); ``"supported"``: those the estimator can model (for
            K-FAC/EK-FAC the Linear/Conv layers, with a warning listing what is left out).
        hvp: how curvature-vector products are differentiated: ``"reverse"`` (default; each
            Hessian batch is linearised once and reused while it fits in memory) or ``"forward"``
            (forward-over-reverse, for models whose operations lack double-backward formulas).
        hessian_indices: training ids the curvature is estimated on (default: all); see
            :mod:`influencer.samplers` for representative subsets.
        batch_size: examples per chunk for per-example gradients (default: as many as fill a
            256 MiB block of ``(B, p)`` gradients, between 128 and 4,096: the whole training set of
            a small model in a few chunks, where per-chunk overhead would otherwise dominate).
        hessian_batch_size: examples per chunk for Hessian-vector products.
        solve_batch: right-hand sides per inverse-HVP call (bounds memory for many test points;
            default: as many as fill a 256 MiB block of ``(k, p)``, between 256 and 4,096).
        device: where to compute (``"cpu"``, ``"cuda"``, ...); default the model's device.
        dtype: compute dtype (e.g. ``torch.float64``); default the model's.
        progress: progress bars on stderr for the long steps (gradient passes, curvature fits,
            CG/LiSSA/Arnoldi iterations with the residual and the time left): ``True`` always;
            ``None`` (default) on a terminal or in a notebook, for steps still running after 2 s;
            ``False`` never.
        distributed: split the work between the ranks of an initialised ``torch.distributed``
            process group (see :mod:`influencer._kernel.distributed`); every rank gets the full results.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        *,
        estimator: Estimator | None = None,
        curvature: CurvatureKind | None = None,
        hvp: HVPMode = "reverse",
        params: Sequence[str] | str | None = None,
        hessian_indices: Sequence[int] | Tensor | None = None,
        batch_size: int | None = None,
        hessian_batch_size: int = 512,
        solve_batch: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        distributed: bool = False,
    ) -> None:
        sizes = [hessian_batch_size, *(n for n in (batch_size, solve_batch) if n is not None)]
        if min(sizes) < 1:
            raise ConfigError("batch_size, hessian_batch_size and solve_batch must be >= 1")
        if not isinstance(task, Task):
            raise ConfigError(f"task must be an influencer.Task, got {type(task).__name__}")
        check_hvp_mode(hvp)
        train = as_examples(train)
        choice = None
        if estimator is None:
            choice = choose_estimator(model, task, train, params=params, curvature=curvature)
            estimator, curvature, params = choice.estimator, choice.curvature, choice.params
            log.info("default estimator: %s", choice.reason)
        elif isinstance(params, str) and params == "supported":
            params = estimator.supported_parameters(model)
        self.fn = ModelFunction(model, task, params, device, dtype)
        self._setup(self.fn, self.fn.theta0, train, estimator, curvature or "hessian", hessian_indices)
        self.choice: Choice | None = choice
        self.batch_size = default_batch_size(self.fn.p, self.fn.dtype) if batch_size is None else batch_size
        self.hessian_batch_size = hessian_batch_size
        self.solve_batch = (
            default_solve_batch(self.fn.p, self.fn.dtype) if solve_batch is None else solve_batch
        )
        self.progress = progress
        self.distributed = distributed
        self.hvp = hvp

    def _setup(
        self,
        fn: ModelFunction,
        theta: Tensor,
        train: Examples,
        estimator: Estimator,
        curvature: CurvatureKind,
        hessian_indices: Sequence[int] | Tensor | None,
    ) -> None:
        """The state that :meth:`replace` may change; everything derived from it starts unfitted."""
        if curvature not in ("hessian", "gauss_newton"):
            raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
        self.fn = fn
        self._theta = theta.detach()
        self.train = train
        self.estimator = estimator
        if not isinstance(self.estimator, Estimator):
            raise ConfigError(
                f"estimator must be an influencer Estimator, got {type(self.estimator).__name__}"
            )
        self.curvature_kind = curvature
        self.hessian_indices = None if hessian_indices is None else train.check_indices(hessian_indices)
        self.curvature: Curvature | None = None
        self._solver: Solver | None = None
        self._reg_grad = fn.regularizer_grad(self._theta)
        self._fingerprints: dict[str, Any] = {}
        self._found_layers: tuple[list[Layer] | None] | None = None  # find_layers(fn), once

    def replace(
        self,
        *,
        estimator: Estimator | None = None,
        curvature: CurvatureKind | None = None,
        hessian_indices: Sequence[int] | Tensor | None = _KEEP,
        theta: Tensor | None = None,
        train: Any = None,
        dtype: torch.dtype | None = None,
    ) -> Influence:
        """A new, unfitted ``Influence`` like this one with some inputs changed.

        Args:
            estimator: another inverse-Hessian method.
            curvature: another curvature kind.
            hessian_indices: another subset to estimate the curvature on (``None``: all the
                training examples; default: keep this one's).
            theta: other parameters ``(p,)`` of the same model (e.g. after retraining or an update).
            train: other training data of the same structure (e.g. relabelled or poisoned); the
                Hessian subset must then be given again unless it is kept valid.
            dtype: compute in another floating dtype (e.g. ``torch.float64`` for references).

        The model, task, parameter choice, chunk sizes, device and distributed mode are shared.
        """
        other = object.__new__(Influence)
        other.__dict__.update(self.__dict__)
        fn = self.fn if dtype is None or dtype == self.fn.dtype else self.fn.cast(dtype)
        new_theta = self.theta if theta is None else theta
        if new_theta.shape != (self.p,):
            raise DataError(
                f"theta must have shape ({self.p},) like the chosen parameters, got {tuple(new_theta.shape)}"
            )
        data = self.train if train is None else self.examples(train)
        indices = self.hessian_indices if hessian_indices is _KEEP else hessian_indices
        other._setup(
            fn,
            new_theta.to(fn.device, fn.dtype),
            data,
            estimator if estimator is not None else self.estimator,
            curvature if curvature is not None else self.curvature_kind,
            indices,
        )
        if estimator is not None or curvature is not None:
            other.choice = None  # no longer the default's choice
        return other

    # ---- basic facts ---------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of training examples (the 1/n in every score)."""
        return len(self.train)

    @property
    def p(self) -> int:
        """Number of parameters influence is computed over."""
        return self.fn.p

    @property
    def theta(self) -> Tensor:
        """The parameters influence is computed at, flat ``(p,)`` (the trained model's by default)."""
        return self._theta

    @property
    def device(self) -> torch.device:
        return self.fn.device

    @property
    def solver(self) -> Solver:
        if self._solver is None:
            raise ConfigError("call fit() before computing influence")
        return self._solver

    def parameters_of(self, model: nn.Module) -> Tensor:
        """The chosen parameters ``(p,)`` of another module of this architecture.

        E.g. a fresh initialisation, to retrain from scratch (:mod:`influencer.retraining`).
        """
        named = dict(model.named_parameters())
        bad = [
            n for n, shape in zip(self.fn.names, self.fn.shapes, strict=True)
            if n not in named or tuple(named[n].shape) != shape
        ]  # fmt: skip
        if bad:
            raise DataError(
                f"the module does not have this model's parameters {bad[:5]} (name and shape); pass a "
                "module built the same way"
            )
        return torch.cat([named[n].detach().reshape(-1) for n in self.fn.names]).to(
            self.device, self.fn.dtype
        )

    def model_at(self, theta: Tensor) -> nn.Module:
        """A copy of the model with the chosen parameters set to ``theta`` ``(p,)``; in eval mode.

        The model given to this object is never modified.
        """
        if theta.shape != (self.p,):
            raise DataError(f"theta must have shape ({self.p},), got {tuple(theta.shape)}")
        new = copy.deepcopy(self.fn.model)
        named = dict(new.named_parameters())
        with torch.no_grad():
            for name, value in self.fn.unflatten(theta.detach()).items():
                named[name].copy_(value.to(named[name].device, named[name].dtype))
        return new.eval()

    def fit(self) -> Influence:
        """Check the task on real data, build the curvature and fit the estimator."""
        self.fn.check(self.fn.prepare(self.train.take(torch.arange(min(2, self.n)))), self.theta)
        self.curvature = self._curvature(self.hessian_indices)
        self._solver = self.estimator.fit(self.curvature)
        self._log_fitted()
        return self

    # ---- saving and loading the fitted state ---------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Save the fitted estimator to the directory ``path`` (created; its two files replaced).

        ``solver.safetensors`` holds the tensors ``fit()`` computed (Exact's Hessian and its
        eigendecomposition, K-FAC/EK-FAC factors, eigenbases and eigenvalues, Arnoldi's eigenpairs,
        LiSSA's scale, a damping found at fit time; nothing for CG, which iterates at every solve);
        ``manifest.json`` holds :meth:`settings` (the fingerprint of model, data, task and
        settings), the solver's ``info`` and the tensors file's sha256. Each file is written
        atomically, the manifest last. Load with :meth:`load` or :meth:`load_fitted`.
        """
        from safetensors.torch import save as safetensors_bytes

        state = self.solver.state_dict()
        # Column-major matrices (eigh's eigenvectors) are stored transposed and read back as the
        # same layout, so that products with them, and the scores, are the same bit for bit.
        columns = sorted(k for k, v in state.items() if _column_major(v))
        data = safetensors_bytes(
            {k: (v.mT if k in columns else v).detach().cpu().contiguous().clone() for k, v in state.items()}
        )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / FITTED_TENSORS, data)
        manifest = {
            "format": FITTED_FORMAT,
            "settings": json_roundtrip(self.settings()),
            "solver": type(self.solver).__name__,
            "info": _json_safe(json_roundtrip(self.solver.info)),
            "column_major": columns,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_json(path / FITTED_MANIFEST, manifest)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, task: Task, train: Any, **kwargs: Any) -> Influence:
        """``Influence(model, task, train, **kwargs)`` with the fitted state saved at ``path``
        instead of ``fit()``; the arguments must be those it was saved with (see :meth:`load_fitted`)."""
        return cls(model, task, train, **kwargs).load_fitted(path)

    def load_fitted(self, path: str | Path) -> Influence:
        """Take the fitted state saved by :meth:`save` at ``path`` in place of :meth:`fit`.

        Refused, naming what changed (model, training data, task, parameters/dtype, curvature or
        estimator), unless this object's :meth:`settings` equal the saved ones: the model's weights
        and the code of its classes (a class defined in a script is fingerprinted with the
        script's source, so define it in a module to share a fit between scripts), the data, the
        task and every setting results depend on.
        """
        from safetensors.torch import load as safetensors_load

        path = Path(path)
        manifest_path, tensors_path = path / FITTED_MANIFEST, path / FITTED_TENSORS
        try:
            manifest = json.loads(manifest_path.read_text())
            data = tensors_path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no saved fit at {path} ({Path(exc.filename).name} is missing): save one with "
                "Influence.save(path) after fit()"
            ) from None
        except json.JSONDecodeError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != FITTED_FORMAT:
            raise ConfigError(
                f"{manifest_path} is not a saved fit ({FITTED_FORMAT}); save one with Influence.save"
            )
        changed = _what_changed(manifest["settings"], json_roundtrip(self.settings()))
        if changed:
            raise ConfigError(
                f"the fit saved at {path} is for other inputs: {changed}. Load it with the model, data "
                "and settings it was saved with, or fit() and save() again"
            )
        if hashlib.sha256(data).hexdigest() != manifest["tensors_sha256"]:
            raise DataError(
                f"{tensors_path} does not match its manifest (a save was interrupted or the file was "
                "changed): fit() and save() again"
            )
        columns = set(manifest.get("column_major", []))
        state = {
            k: (v.to(self.device).mT if k in columns else v.to(self.device))
            for k, v in safetensors_load(data).items()
        }
        self.fn.check(self.fn.prepare(self.train.take(torch.arange(min(2, self.n)))), self.theta)
        self.curvature = self._curvature(self.hessian_indices)
        self._solver = self.estimator.load_solver(self.curvature, state, manifest["info"])
        log.info("loaded the fitted %s from %s", self.estimator.name, path)
        return self

    def _log_fitted(self) -> None:
        info = self.solver.info
        damping: Any = info.get("damping", getattr(self.estimator, "damping", None))
        relative = getattr(self.estimator, "relative_damping", 0.0)
        if relative and "damping" not in info:
            damping = f"{damping:g} + {relative:g} x each layer's mean eigenvalue"
        log.info(
            "fitted %s on the %s curvature of %d parameters (damping %s%s)",
            self.estimator.name,
            self.curvature_kind,
            self.p,
            f"{damping:.3g}" if isinstance(damping, float) else damping,
            f": {info['damping_reason']}" if "damping_reason" in info else "",
        )

    def _curvature(self, indices: Tensor | None) -> Curvature:
        return Curvature(
            self.fn,
            self.theta,
            self.train,
            indices,
            self.curvature_kind,
            self.hessian_batch_size,
            progress=self.progress,
            distributed=self.distributed,
            hvp=self.hvp,
        )

    def settings(self) -> dict[str, Any]:
        """What every result depends on, JSON-able: the single source of cache fingerprints.

        ``"gradients"`` covers training and test gradients (model class and state, parameters,
        task, training data, parameter choice, dtype); ``"curvature"`` adds what inverse-HVPs
        depend on (curvature kind, the examples it is estimated on, the estimator's settings).
        Digests of the weights and data are computed once per object.
        """
        if not self._fingerprints:
            self._fingerprints = {
                "model": model_fingerprint(self.fn.model, self.fn.state(self.theta)),
                "train": hash_examples(self.train),
            }
        gradients = {
            **self._fingerprints,
            "task": task_fingerprint(self.fn.task),
            "params": list(self.fn.names),
            "dtype": str(self.fn.dtype).removeprefix("torch."),
        }
        examples: Any = "all" if self.hessian_indices is None else hash_json(self.hessian_indices.tolist())
        curvature = {
            "kind": self.curvature_kind,
            "examples": examples,
            "estimator": self.estimator.settings(),
        }
        if self.choice is not None:
            curvature["chosen_by_default"] = self.choice.reason
        return {"gradients": gradients, "curvature": curvature}

    # ---- gradients -----------------------------------------------------------------------------

    def examples(self, data: Any) -> Examples:
        """``data`` as :class:`~influencer.data.Examples`, checked to be shaped like the training data."""
        ex = as_examples(data)

        def kinds(e: Examples) -> list[tuple[tuple[int, ...], bool]]:
            # Floating precision may differ (batches are cast to the compute dtype); kind may not.
            return [(s, d.is_floating_point) for s, d in e.example_spec()]

        # Padded sequences (Task.variable_length) may differ in length and layout between data sets.
        if self.fn.task.variable_length or ex is self.train:
            return ex
        if kinds(ex) != kinds(self.train):
            mine = ", ".join(f"{tuple(s)} {d}" for s, d in self.train.example_spec())
            theirs = ", ".join(f"{tuple(s)} {d}" for s, d in ex.example_spec())
            raise DataError(
                f"these examples do not match the training data: each training example has tensors "
                f"[{mine}] (shape per example, dtype) but these have [{theirs}]. Pass data "
                "preprocessed the same way as the training set"
            )
        return ex

    def _checked(self, g: Tensor, idx: Tensor, what: str) -> Tensor:
        # A NaN or inf anywhere in a row makes its sum non-finite, and row sums cost a small
        # fraction of an elementwise test. Only when a sum is not finite (a bad row, or a large
        # finite row overflowing) are the rows looked at element by element.
        if bool(torch.isfinite(g.sum(dim=1)).all()):
            return g
        bad = ~torch.isfinite(g).all(dim=1)
        if bad.any():
            ids = idx[bad.cpu()][:10].tolist()
            raise NonFiniteError(
                f"the {what} gradient is NaN or infinite for example(s) {ids}: check those inputs, "
                "the loss (e.g. log of 0) and the model's weights; use float64 if it overflows"
            )
        return g

    def train_gradients(
        self, indices: Sequence[int] | Tensor | None = None, desc: str = "training gradients"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(ids, G)`` chunks of per-example objective gradients ``g_i``, ``G`` ``(c, p)``.

        With ``distributed=True`` each rank yields only its own block of ``indices``.
        """
        yield from self._train_chunks(self.fn.loss_grads, indices, desc)

    def _loss_gradients(
        self, indices: Sequence[int] | Tensor | None, desc: str
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Like :meth:`train_gradients` but without ``grad Omega`` in each row: ``grad loss_i``."""
        yield from self._train_chunks(self.fn.example_loss_grads, indices, desc)

    def _train_chunks(
        self, method: Callable[[Tensor, Any], Tensor], indices: Sequence[int] | Tensor | None, desc: str
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for ids, batch in self._train_batches(indices, desc):
            with self.fn.failures_explained(self.theta, batch, ids):
                g = method(self.theta, batch)
            yield ids, self._checked(g, ids, "training-loss")

    def _train_batches(
        self, indices: Sequence[int] | Tensor | None, desc: str
    ) -> Iterator[tuple[Tensor, Any]]:
        """``(ids, prepared batch)`` chunks of the training examples (this rank's when distributed)."""
        idx = self.train.check_indices(indices)
        if self.distributed:
            idx = shard(idx)
        chunks = self.train.chunks(self.batch_size, idx)
        total = -(-len(idx) // self.batch_size)
        for ids, batch in progress_bar(chunks, desc, self.progress, total=total, unit="batch"):
            self.fn.task.check_batch(batch, ids)
            yield ids, self.fn.prepare(batch)

    def gradients(self, data: Any, kind: str = "measurement") -> Tensor:
        """Per-example gradients ``(m, p)`` of the measurement (default) or of ``loss + Omega``."""
        if kind not in ("measurement", "loss"):
            raise ConfigError(f"kind must be 'measurement' or 'loss', got {kind!r}")
        ex = self.examples(data)
        method = self.fn.measurement_grads if kind == "measurement" else self.fn.loss_grads
        out = []
        total = -(-len(ex) // self.batch_size)
        chunks = progress_bar(
            ex.chunks(self.batch_size), f"{kind} gradients", self.progress and total > 1, total
        )
        for ids, batch in chunks:
            self.fn.task.check_batch(batch, ids)
            batch = self.fn.prepare(batch)
            with self.fn.failures_explained(self.theta, batch, ids):
                g = method(self.theta, batch)
            out.append(self._checked(g, ids, kind))
        return torch.cat(out)

    def _evaluate(self, method: Any, data: Any, theta: Tensor | None, desc: str) -> Tensor:
        t = self.theta if theta is None else theta.to(self.theta)
        ex = self.examples(data)
        total = -(-len(ex) // self.batch_size)
        chunks = progress_bar(ex.chunks(self.batch_size), desc, self.progress and total > 1, total=total)
        with torch.no_grad():
            parts = [method(t, self.fn.prepare(b)) for _, b in chunks]
        return torch.cat(parts)

    def measurements(self, data: Any, theta: Tensor | None = None) -> Tensor:
        """The test measurement ``f(z)`` ``(m,)`` of each example (the loss by default), no gradients.

        At ``theta`` ``(p,)`` when given (e.g. retrained parameters), else at this object's.
        """
        return self._evaluate(self.fn.measurement, data, theta, "measurements")

    def losses(self, data: Any | None = None, theta: Tensor | None = None) -> Tensor:
        """Per-example training loss ``(m,)`` (without the regulariser) of ``data`` (default: train)."""
        return self._evaluate(self.fn.loss, self.train if data is None else data, theta, "losses")

    def outputs(self, data: Any, theta: Tensor | None = None) -> Tensor:
        """The task's model outputs ``(m, ...)`` for ``data`` (e.g. logits), no gradients."""
        return self._evaluate(self.fn.outputs, data, theta, "outputs")

    def gradient_sum(self, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """``sum_{i in S} g_i`` ``(p,)`` over training ids ``S`` (default all), summed over ranks."""
        total = torch.zeros_like(self.theta)
        for _, g in self.train_gradients(indices, desc="gradient sum"):
            total += g.sum(0)
        return all_reduce_sum(total) if self.distributed else total

    def curvature_product(self, vectors: Tensor, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """``(1/|S|) sum_{i in S} Hess l_i(theta) v`` for each row ``v`` of ``(k, p)``, undamped.

        ``l_i = loss_i + Omega`` and the curvature kind is this object's; ``S`` defaults to the
        examples the curvature is estimated on. Split between ranks when distributed.
        """
        idx = self.hessian_indices if indices is None else self.train.check_indices(indices)
        if idx is not None and len(idx) == 0:
            raise DataError("curvature_product needs at least one training id")
        if indices is None and self.curvature is not None:
            return self.curvature.matvec(vectors)
        return self._curvature(idx).matvec(vectors)

    # ---- inverse HVPs --------------------------------------------------------------------------

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """``(H + damping I)^-1 v`` for each row of ``(k, p)``, in chunks of ``solve_batch``."""
        v = vectors.detach().reshape(-1, self.p).to(self.theta)
        parts = [
            self.solver.solve(v[i : i + self.solve_batch])
            for i in progress_bar(
                range(0, len(v), self.solve_batch),
                "inverse HVPs",
                self.progress and len(v) > self.solve_batch,
            )
        ]
        return torch.cat(parts).reshape(vectors.shape)

    def test_directions(self, test: Any) -> Tensor:
        """``s_test = H^-1 grad f(z_test)`` for each test example, ``(m, p)``."""
        return self.inverse_hvp(self.gradients(test, "measurement"))

    # ---- influence -----------------------------------------------------------------------------

    def scores(self, test: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Removal scores ``(m, c)`` of training examples (default all) on each test example.

        Positive = helpful, negative = harmful (see :mod:`influencer._kernel.scores`).
        """
        if self.solver.identity and (rows := self._test_rows(test)) is not None:
            return self._scores(rows, train_indices)
        if isinstance(self.solver, KroneckerSolver) and (rows := self._test_rows(test)) is not None:
            # solved in layer form: K-FAC's directions as a few rank-one terms per layer
            return self._scores(self.solver.solve_rows(rows), train_indices)
        return self._scores(self.test_directions(test), train_indices)

    def _score_layers(self) -> list[Layer] | None:
        """The layers holding every chosen parameter (a Kronecker solver's, or found), else None."""
        if isinstance(self._solver, KroneckerSolver):
            return self._solver.layers
        if self._found_layers is None:
            try:
                self._found_layers = (find_layers(self.fn),)
            except ConfigError:
                self._found_layers = (None,)
        return self._found_layers[0]

    def _test_rows(self, test: Any) -> LayerRows | None:
        """The test measurements' gradients in layer form (the gradient dot product's directions,
        never formed as ``(m, p)``); None where the layers do not hold them or a row is not finite
        (then the per-example path computes them, and names any bad example)."""
        layers = self._score_layers()
        if layers is None:
            return None
        parts = []
        for ids, batch in self.examples(test).chunks(self.batch_size):
            self.fn.task.check_batch(batch, ids)
            batch = self.fn.prepare(batch)
            with self.fn.failures_explained(self.theta, batch, ids):
                rows = capture_rows(self.fn, layers, self.theta, batch, self.fn.task.measurement)
            if rows is None or not rows.finite():
                return None
            parts.append(rows)
        return LayerRows.cat(parts) if parts else None

    def scores_from_directions(
        self, directions: Tensor, train_indices: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """Scores ``(m, c)`` from precomputed ``s_test`` directions ``(m, p)``."""
        return self._scores(directions.to(self.theta), train_indices)

    def _scores(self, directions: Tensor | LayerRows, train_indices: Sequence[int] | Tensor | None) -> Tensor:
        """Scores ``(m, c)`` from directions ``(m, p)`` or in layer form (:class:`LayerRows`)."""
        # When every chosen parameter is in a Linear/Conv layer (whatever the solver), the layers give
        # the loss-gradient dot products without (c, p) per-example gradients.
        if isinstance(directions, LayerRows):
            layers = self._score_layers()
            # s . g_i = s . grad loss_i + s . grad Omega: the regulariser enters once, as a column shift.
            shift = (directions.dot(layers, self._reg_grad) / self.n)[:, None]  # (m, 1)
        else:
            layers = self._score_layers() if directions.shape[0] > 0 else None
            shift = removal_scores(directions, self._reg_grad[None], self.n)  # (m, 1)
        scorer = LayerScorer(self.fn, layers, directions) if layers is not None else None
        probe = None
        cols = []
        for ids, batch in self._train_batches(train_indices, "training gradients"):
            got = scorer(self.theta, batch) if scorer is not None else None
            if got is not None:
                block, sums = got
                self._checked(sums, ids, "training-loss")
                cols.append(block.div_(self.n).add_(shift))
                continue
            scorer = None  # the layers do not hold the whole loss gradient: per-example gradients
            if probe is None:
                if isinstance(directions, LayerRows):
                    directions = directions.dense(layers, self.theta)
                # A row of ones makes the product also return each gradient's row sum, the finite
                # check, at almost no cost: the product is bound by reading the gradients anyway.
                probe = torch.cat([directions, directions.new_ones(1, self.p)])  # (m + 1, p)
            g = self.fn.example_loss_grads(self.theta, batch)
            block = removal_scores(probe, g, self.n)  # (m + 1, c)
            if not bool(torch.isfinite(block[-1]).all()):
                self._checked(g, ids, "training-loss")  # names the bad examples (or was an overflow)
            cols.append(block[:-1].add_(shift))
        m = directions.m if isinstance(directions, LayerRows) else directions.shape[0]
        local = (
            (cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)) if cols else self.theta.new_zeros(m, 0)
        )
        return all_gather_blocks(local, dim=1) if self.distributed else local

    def influence_up_loss(self, test: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """The paper's ``I_up,loss`` ``(m, c)`` = ``-grad f(test)^T H^-1 g_i`` (unscaled)."""
        return up_loss_from_scores(self.scores(test, train_indices), self.n)

    def influence_up_params(self, train_indices: Sequence[int] | Tensor) -> Tensor:
        """The paper's ``I_up,params`` ``(c, p)`` = ``-H^-1 g_i``: d theta / d(up-weight of z_i)."""
        parts = [-self.inverse_hvp(g) for _, g in self.train_gradients(train_indices)]
        local = torch.cat(parts) if parts else self.theta.new_zeros(0, self.p)
        return all_gather_blocks(local, dim=0) if self.distributed else local

    def removal_params(self, train_indices: Sequence[int] | Tensor) -> Tensor:
        """Predicted parameter change ``(1/n) H^-1 sum_{i in S} g_i`` ``(p,)`` if ids S are removed."""
        return self.inverse_hvp(self.gradient_sum(train_indices)[None])[0] / self.n

    def self_influence(self, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Self-influence ``(c,)``: ``(1/n) grad loss(z_i)^T H^-1 g_i``, the score of z_i on itself."""
        if (
            isinstance(self.solver, KroneckerSolver)
            and (local := self._layer_self_influence(indices)) is not None
        ):
            return all_gather_blocks(local, dim=0) if self.distributed else local
        return self._self_influence_from_gradients(indices)

    def _layer_self_influence(self, indices: Sequence[int] | Tensor | None) -> Tensor | None:
        """Self-influence from the training examples' layer rows and a Kronecker solver: ``g_i =
        grad loss_i + grad Omega``, so ``grad loss_i^T H^-1 g_i`` is the quadratic form
        (:meth:`KroneckerSolver.quadratic_rows`) plus ``grad loss_i . H^-1 grad Omega`` (one solve for
        all). None where the layers do not hold the loss gradients or a row is not finite (the
        per-example path then computes them and names any bad example)."""
        solver = self.solver
        assert isinstance(solver, KroneckerSolver)
        u = self.inverse_hvp(self._reg_grad[None])[0]  # H^-1 grad Omega (p,)
        out = []
        verified = False
        for ids, batch in self._train_batches(indices, "self-influence"):
            with self.fn.failures_explained(self.theta, batch, ids):
                rows = capture_rows(
                    self.fn, solver.layers, self.theta, batch, self.fn.task.loss, verify=not verified
                )
            if rows is None or not rows.finite():
                return None
            verified = True
            out.append((solver.quadratic_rows(rows) + rows.dot(solver.layers, u)) / self.n)
        return torch.cat(out) if out else self.theta.new_zeros(0)

    def _self_influence_from_gradients(self, indices: Sequence[int] | Tensor | None) -> Tensor:
        """:meth:`self_influence` from per-example gradients ``(c, p)`` and a solve of each."""
        out = []
        for _, loss_grad in self._loss_gradients(indices, "self-influence"):
            g = loss_grad + self._reg_grad  # g_i includes grad Omega; the loss itself does not
            out.append((loss_grad * self.inverse_hvp(g)).sum(1) / self.n)
        local = torch.cat(out) if out else self.theta.new_zeros(0)
        return all_gather_blocks(local, dim=0) if self.distributed else local


FITTED_FORMAT = "influencer.fitted/1"
FITTED_MANIFEST = "manifest.json"
FITTED_TENSORS = "solver.safetensors"

# Settings by what a user changed; the default's reason is a statement, not an input of results.
_SECTIONS = {
    "gradients.model.state": "the model's weights",
    "gradients.model.classes": "the code of the model's classes",
    "gradients.train": "the training data",
    "gradients.task": "the task",
    "gradients.params": "the parameters chosen (params)",
    "gradients.dtype": "the dtype",
    "curvature.kind": "the curvature kind",
    "curvature.examples": "the curvature's examples (hessian_indices)",
    "curvature.estimator": "the estimator",
}
_STATEMENTS = ("curvature.chosen_by_default",)


def _what_changed(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """Which of model, data, task, parameters, curvature and estimator differ, and how; "" if none."""
    a, b = flatten(saved), flatten(now)
    for key in _STATEMENTS:
        a.pop(key, None)
        b.pop(key, None)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "unset") != b.get(k, "unset")]
    if not keys:
        return ""
    labels = [label for prefix, label in _SECTIONS.items() if any(k.startswith(prefix) for k in keys)]
    labels += ["other settings"] if not labels else []
    if a.get("curvature.estimator.estimator") != b.get("curvature.estimator.estimator"):
        # another estimator altogether: its name says it, not each of its settings
        for d in (a, b):
            for k in [
                k for k in d if k.startswith("curvature.estimator.") and k != "curvature.estimator.estimator"
            ]:
                del d[k]
    return f"{', '.join(labels)} changed ({describe_changes(a, b)})"


def _column_major(t: Tensor) -> bool:
    return t.ndim == 2 and min(t.shape) > 1 and not t.is_contiguous() and t.mT.is_contiguous()


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings (JSON has no NaN or infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj
