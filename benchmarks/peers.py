"""One adapter per library: the same method on the same problem, mapped to our score convention.

Our convention (``influencer._kernel.scores``):
``score[j, i] = (1/n) grad f(test_j)^T (H + damping I)^-1 g_i``
with ``H`` the Hessian of ``J = mean_i CE_i + Omega``, ``Omega = weight_decay / 2 ||theta||^2``,
``g_i = grad(CE_i + Omega)`` and ``f`` the test cross-entropy: the predicted change of the test loss
when ``z_i`` is removed, positive = helpful, scale ``1/n``.

Peers whose loss cannot contain ``Omega`` (captum and pyDVL take ``loss(outputs, labels)``) give
scores built from ``grad CE_i`` instead of ``g_i``; their curvature is completed by passing
``weight_decay + damping`` as their diagonal regulariser. The missing ``grad Omega`` term is
recovered exactly: at the optimum ``grad J = 0``, so ``grad Omega = -(1/n) sum_j grad CE_j`` and
``g_i = grad CE_i - mean_j grad CE_j``, hence ``ours[j, i] = theirs[j, i] - mean_k theirs[j, k]``
(after scaling). Each adapter's docstring states its full mapping; agreement of each peer's exact
method with ours to ~1e-8 (the table's rel err) is the check that the mapping is right.

Every adapter returns scores ``(m, n)`` in our convention; ``NotAvailableError`` marks a method a
library does not have.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from common import Problem
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

METHODS = ("exact", "cg", "lissa", "arnoldi", "ekfac")


class NotAvailableError(Exception):
    """The library has no implementation of this method."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Hyperparameters shared by every library (``lissa_scale=None``: 1.5 x largest eigenvalue)."""

    damping: float = 1e-3
    cg_tol: float = 1e-8
    cg_max_iter: int = 1000
    lissa_depth: int = 1000
    lissa_batch: int = 32
    lissa_repeats: int = 1
    lissa_scale: float | None = None
    arnoldi_rank: int = 50
    arnoldi_iterations: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.damping >= 0 or not self.cg_tol > 0:
            raise ValueError("damping must be >= 0 and cg_tol > 0")
        if min(self.lissa_depth, self.lissa_batch, self.lissa_repeats, self.cg_max_iter) < 1:
            raise ValueError("LiSSA depth/batch/repeats and CG max_iter must be >= 1")
        if self.arnoldi_iterations < self.arnoldi_rank:
            raise ValueError("arnoldi_iterations must be >= arnoldi_rank")


@dataclasses.dataclass
class Resolved:
    """Per-problem values every library receives: settings + what ours measured once."""

    settings: Settings
    lissa_scale: float  # the same explicit LiSSA scale for all
    cg_iterations: int  # ours' CG iteration count, for peers without a tolerance (dattri)


def _train_loader(problem: Problem, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*problem.train), batch_size=batch_size or problem.n, shuffle=shuffle)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _center(scores: Tensor) -> Tensor:
    """``theirs - row mean``: adds the ``grad Omega`` part of ``g_i`` (exact at the optimum)."""
    return scores - scores.mean(dim=1, keepdim=True)


# ---- ours ---------------------------------------------------------------------------------------


class Ours:
    """influencer itself: ``Influence(...).fit().scores(test)``; already in our convention."""

    name = "influencer"
    package = "influencer"

    def __init__(self) -> None:
        self.last_info: dict[str, Any] = {}

    def estimator(self, method: str, r: Resolved):
        from influencer import CG, EKFAC, Arnoldi, Exact, LiSSA

        s = r.settings
        if method == "exact":
            return Exact(damping=s.damping)
        if method == "cg":
            return CG(damping=s.damping, tol=s.cg_tol, max_iter=s.cg_max_iter)
        if method == "lissa":
            return LiSSA(
                damping=s.damping,
                depth=s.lissa_depth,
                repeats=s.lissa_repeats,
                scale=r.lissa_scale,
                batch_size=s.lissa_batch,
                seed=s.seed,
            )
        if method == "arnoldi":
            return Arnoldi(
                damping=s.damping, rank=s.arnoldi_rank, iterations=s.arnoldi_iterations, seed=s.seed
            )
        if method == "ekfac":
            # The exact expectation over the model's outputs: EK-FAC of the Gauss-Newton matrix.
            return EKFAC(damping=s.damping, fisher="exact")
        raise NotAvailableError(method)

    def scores(self, method: str, problem: Problem, r: Resolved) -> Tensor:
        from influencer import Influence

        inf = Influence(
            problem.fresh_model(), problem.task, problem.train, estimator=self.estimator(method, r)
        ).fit()
        out = inf.scores(problem.test)
        self.last_info = dict(inf.solver.info)
        return out


# ---- captum -------------------------------------------------------------------------------------


class Captum:
    """captum.influence: ``NaiveInfluenceFunction`` (exact) and ``ArnoldiInfluenceFunction``.

    captum's score is ``grad L(test)^T H_c^-1 grad L(z_i)`` with ``H_c`` the Hessian of the *summed*
    loss over the training set, ``n H_CE``, plus ``hessian_reg I``; its sign is already "removal
    effect" (Koh & Liang's ``-I_up,loss``). With ``hessian_reg = n (weight_decay + damping)``,
    ``H_c = n (H + damping I)``, so ``theirs = (1/n) grad f^T (H + damping I)^-1 grad CE_i`` and
    ``ours = theirs - row mean`` (see the module docstring). No CG or LiSSA in captum.
    """

    name = "captum"
    package = "captum"

    def scores(self, method: str, problem: Problem, r: Resolved) -> Tensor:
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        s = r.settings
        common = {
            "model": problem.fresh_model(),
            "train_dataset": _train_loader(problem),
            "checkpoint": "in-memory",  # weights are already in the model
            "checkpoints_load_func": lambda model, path: 1.0,
            "loss_fn": nn.CrossEntropyLoss(reduction="none"),
            "batch_size": problem.n,
            "sample_wise_grads_per_batch": False,
            "hessian_reg": problem.n * (problem.weight_decay + s.damping),
            "hessian_inverse_tol": 0.0,  # keep every positive eigenvalue: no truncation
        }
        if method == "exact":
            inf = NaiveInfluenceFunction(**common, projection_dim=problem.p, seed=s.seed)
        elif method == "arnoldi":
            inf = ArnoldiInfluenceFunction(
                **common,
                projection_dim=s.arnoldi_rank,
                arnoldi_dim=s.arnoldi_iterations,
                arnoldi_tol=1e-12,
                seed=s.seed,
            )
        else:
            raise NotAvailableError(method)
        theirs = inf.influence(problem.test)  # (m, n)
        return _center(theirs)


# ---- dattri -------------------------------------------------------------------------------------


class Dattri:
    """dattri: ``IFAttributorExplicit`` / ``CG`` / ``LiSSA`` / ``Arnoldi`` on an ``AttributionTask``.

    dattri's loss is a function of the parameters, so ``Omega`` is part of it and its training
    gradients are our ``g_i``; the test target is the plain cross-entropy. ``attribute`` returns
    ``(n, m)`` = ``g_i^T (H + damping I)^-1 grad f(test)``, the removal effect unscaled:
    ``ours = theirs.T / n``. Quirks handled here:

    * the Hessian is taken per batch of the "full train" loader and the inverse-HVPs of the
      batches are *summed*, so that loader must hold the training set in one batch;
    * attribution recomputes the inverse-HVP for every (train batch, test batch) pair, so the
      train loader is one batch too;
    * its CG ignores ``tol`` (fixed ``max_iter`` iterations): it gets ours' iteration count;
    * its LiSSA update is ``h = v + (1 - d) h - H h / s``, i.e. ``(H + d s I)^-1``: ``d = damping / s``;
      and its LiSSA casts every data tensor to float32 (``_lissa_collate_fn``), so the loss
      casts inputs back to the model's dtype and labels back to integers;
    * it creates some tensors in torch's default dtype (the Arnoldi start vector, the score
      matrix), so it runs with the default dtype set to the model's.
    """

    name = "dattri"
    package = "dattri"

    def scores(self, method: str, problem: Problem, r: Resolved) -> Tensor:
        from dattri.algorithm import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask

        s = r.settings
        model = problem.fresh_model()
        dtype = next(model.parameters()).dtype
        wd = problem.weight_decay

        def cross_entropy(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            x, y = data
            out = functional_call(model, params, (x.to(dtype),))
            return F.cross_entropy(out, y.long())

        def objective(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            penalty = sum((q * q).sum() for q in params.values())
            return cross_entropy(params, data) + 0.5 * wd * penalty

        task = AttributionTask(
            loss_func=objective,
            model=model,
            checkpoints=model.state_dict(),
            target_func=cross_entropy,
        )
        device = str(problem.device)
        if method == "exact":
            att = IFAttributorExplicit(task, device=device, regularization=s.damping)
        elif method == "cg":
            att = IFAttributorCG(
                task,
                device=device,
                max_iter=r.cg_iterations,
                tol=s.cg_tol,
                mode="rev-fwd",
                regularization=s.damping,
            )
        elif method == "lissa":
            att = IFAttributorLiSSA(
                task,
                device=device,
                batch_size=s.lissa_batch,
                num_repeat=s.lissa_repeats,
                recursion_depth=s.lissa_depth,
                damping=s.damping / r.lissa_scale,
                scaling=r.lissa_scale,
                mode="rev-rev",  # its rev-fwd HVP cannot take LiSSA's (params, data) tuple
            )
        elif method == "ekfac":
            # Its Fisher comes from the task's target (true labels: the empirical Fisher) and has
            # no L2 term, which the damping supplies.
            att = IFAttributorEKFAC(task, device=device, damping=wd + s.damping)
        elif method == "arnoldi":
            att = IFAttributorArnoldi(
                task,
                device=device,
                proj_dim=s.arnoldi_rank,
                max_iter=s.arnoldi_iterations,
                regularization=s.damping,
                seed=s.seed,
            )
        else:
            raise NotAvailableError(method)
        torch.manual_seed(s.seed)
        full = _train_loader(problem)
        test = DataLoader(TensorDataset(*problem.test), batch_size=problem.test[0].shape[0])
        with default_dtype(dtype):
            att.cache(full)
            theirs = att.attribute(full, test)  # (n, m)
        return theirs.T.to(dtype) / problem.n


# ---- pyDVL --------------------------------------------------------------------------------------


class PyDVL:
    """pyDVL: ``DirectInfluence`` / ``CgInfluence`` / ``LissaInfluence`` / ``ArnoldiInfluence``.

    pyDVL's loss is ``loss(outputs, labels)`` (mean over the batch), its Hessian is that of the
    mean loss, and ``influences(..., mode=Up)`` is ``<(H_CE + reg I)^-1 grad f(test), grad CE_i>``,
    the removal effect unscaled. With ``regularization = weight_decay + damping``:
    ``ours = (theirs - row mean) / n``. Its LiSSA stops early once ``max |residual / h| < rtol``:
    ``rtol=0`` runs the full depth like the others; its minibatch is the loader's batch size.
    """

    name = "pydvl"
    package = "pyDVL"

    def scores(self, method: str, problem: Problem, r: Resolved) -> Tensor:
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            EkfacInfluence,
            LissaInfluence,
        )

        s = r.settings
        model = problem.fresh_model()
        reg = problem.weight_decay + s.damping
        loader = _train_loader(problem)
        if method == "exact":
            inf = DirectInfluence(model, F.cross_entropy, regularization=reg)
        elif method == "cg":
            inf = CgInfluence(
                model,
                F.cross_entropy,
                regularization=reg,
                rtol=s.cg_tol,
                atol=0.0,
                maxiter=s.cg_max_iter,
                solve_simultaneously=True,
                warn_on_max_iteration=False,
            )
        elif method == "lissa":
            torch.manual_seed(s.seed)
            loader = _train_loader(problem, s.lissa_batch)
            inf = LissaInfluence(
                model,
                F.cross_entropy,
                regularization=reg,
                maxiter=s.lissa_depth,
                dampen=0.0,
                scale=r.lissa_scale,
                rtol=0.0,
                warn_on_max_iteration=False,
            )
            if s.lissa_repeats != 1:
                raise NotAvailableError("pyDVL's LiSSA has no repeats")
        elif method == "arnoldi":
            inf = ArnoldiInfluence(
                model,
                F.cross_entropy,
                regularization=reg,
                rank=s.arnoldi_rank,
                krylov_dimension=s.arnoldi_iterations,
                eigen_computation_on_gpu=problem.device.type == "cuda",
            )
        elif method == "ekfac":
            # Cross-entropy only, with a label-free surrogate of the Fisher for its factors; its
            # eigenvalue refit works in float32 only, so it gets a float32 copy of model and data.
            dtype = next(model.parameters()).dtype
            model = model.float()
            inf = EkfacInfluence(model, update_diagonal=True, hessian_regularization=reg)
            inf = inf.fit(DataLoader(TensorDataset(problem.x_train.float(), problem.y_train), problem.n))
            x_test, x_train = problem.x_test.float(), problem.x_train.float()
            theirs = inf.influences(x_test, problem.y_test, x_train, problem.y_train, mode=InfluenceMode.Up)
            return _center(theirs.to(dtype)) / problem.n
        else:
            raise NotAvailableError(method)
        inf = inf.fit(loader)
        theirs = inf.influences(*problem.test, *problem.train, mode=InfluenceMode.Up)  # (m, n)
        return _center(theirs) / problem.n


LIBRARIES = {"influencer": Ours, "captum": Captum, "dattri": Dattri, "pydvl": PyDVL}


def largest_eigenvalue_bound(max_eigenvalue: float) -> float:
    """LiSSA's scale from the largest eigenvalue of ``H + damping I``: 1.5x, as ours defaults to."""
    if not math.isfinite(max_eigenvalue) or max_eigenvalue <= 0:
        raise ValueError(f"largest eigenvalue must be finite and positive, got {max_eigenvalue}")
    return 1.5 * max_eigenvalue
