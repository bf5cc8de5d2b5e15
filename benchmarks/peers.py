"""One adapter per library: the same method on the same problem, mapped to our score convention.

Our convention (``influencer._kernel.scores``):
``score[j, i] = (1/n) grad f(test_j)^T (H + damping I)^-1 g_i``
with ``H`` the Hessian of ``J = mean_i CE_i + Omega``, ``Omega = weight_decay / 2 ||theta||^2``,
``g_i = grad(CE_i + Omega)`` and ``f`` the test cross-entropy: the predicted change of the test loss
when ``z_i`` is removed, positive = helpful, scale ``1/n``.

Peers whose loss cannot contain ``Omega`` (captum, pyDVL, kronfluence and bergson take a loss of the
outputs and labels) give scores built from ``grad CE_i`` instead of ``g_i``; their curvature is
completed by passing ``weight_decay + damping`` as their diagonal regulariser. The missing
``grad Omega`` term is recovered exactly: at the optimum ``grad J = 0``, so
``grad Omega = -(1/n) sum_j grad CE_j`` and ``g_i = grad CE_i - mean_j grad CE_j``, hence
``ours[j, i] = theirs[j, i] - mean_k theirs[j, k]`` (after scaling), for any linear preconditioner.
Each adapter's docstring states its full mapping; agreement of each peer's exact method with ours
to ~1e-8, and of kronfluence's empirical-Fisher EK-FAC with ours to ~1e-10 (the tables' ``rel_err``
and ``rel_ours``), is the check that the mappings are right.

Every adapter's :meth:`run` returns a :class:`Run`: scores ``(m, n)`` in our convention plus the wall
time of its two stages, ``fit`` (everything that does not depend on the test points: curvature,
factors, gradient store) and ``score`` (test gradients, inverse-HVPs, products with the training
gradients). ``NotAvailableError`` marks a method a library does not have.

Precision: every library runs in the problem's dtype (float64 unless ``--dtype float32``), including
the parts that allocate in torch's default dtype (dattri, pyDVL's EK-FAC: run with the default set
to the model's dtype) or have their own dtype settings (kronfluence: every dtype argument).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from common import Problem, synchronize
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

# ekfac/kfac: the Gauss-Newton matrix (= true Fisher for cross-entropy); ekfac-emp: EK-FAC of the
# empirical Fisher (true labels); identity: the gradient dot product (H^-1 ~ I); identity-proj: the
# same after a random projection of the gradients (a projected gradient store).
METHODS = ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac", "ekfac-emp", "identity", "identity-proj")
# The method a row's ``rel_ours`` compares with: the same one in influencer, or what it approximates.
OURS_COUNTERPART = {"identity-proj": "identity"}


# Short notes shown in the tables for rows whose method differs from ours in a documented way.
NOTES = {
    ("kronfluence", "ekfac"): "true Fisher: 1 sampled label/example",
    ("kronfluence", "kfac"): "true Fisher: 1 sampled label/example",
    ("pydvl", "ekfac"): "label-free Fisher surrogate",
    ("influencer", "ekfac"): "true Fisher: default (1 sampled label/example at 10 classes)",
    ("influencer", "kfac"): "true Fisher: default (1 sampled label/example at 10 classes)",
    ("bergson", "identity-proj"): "two-sided Rademacher, k x k per layer",
    ("influencer", "identity-proj"): "store on disk: Rademacher k x k per layer",
    ("dattri", "identity-proj"): "its random projector, same width",
}


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
    projection_dim: int = 16  # identity-proj: bergson's per-side size per layer (k x k per layer)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.damping >= 0 or not self.cg_tol > 0:
            raise ValueError("damping must be >= 0 and cg_tol > 0")
        if min(self.lissa_depth, self.lissa_batch, self.lissa_repeats, self.cg_max_iter) < 1:
            raise ValueError("LiSSA depth/batch/repeats and CG max_iter must be >= 1")
        if self.arnoldi_iterations < self.arnoldi_rank:
            raise ValueError("arnoldi_iterations must be >= arnoldi_rank")
        if self.projection_dim < 1:
            raise ValueError("projection_dim must be >= 1")


@dataclasses.dataclass
class Resolved:
    """Per-problem values every library receives: settings + what ours measured once."""

    settings: Settings
    lissa_scale: float  # the same explicit LiSSA scale for all
    cg_iterations: int  # plain CG's iteration count, for peers without a tolerance (dattri)


@dataclasses.dataclass
class Run:
    """One library's scores ``(m, n)`` in our convention and the seconds of its stages."""

    scores: Tensor
    fit_seconds: float
    score_seconds: float

    @property
    def seconds(self) -> float:
        return self.fit_seconds + self.score_seconds


class Stages:
    """``with st("fit"): ...`` / ``with st("score"): ...``: wall time per stage, GPU synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {"fit": 0.0, "score": 0.0}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    def result(self, scores: Tensor) -> Run:
        return Run(scores, self.seconds["fit"], self.seconds["score"])


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


def _dtype(problem: Problem) -> torch.dtype:
    return next(problem.model.parameters()).dtype


def plain_modules(model: nn.Module) -> nn.Module:
    """A copy built from plain ``nn.Linear`` (a subclass such as our ``LogisticRegression`` becomes
    ``Sequential(Linear)``): kronfluence dispatches on the exact module type and bergson tracks only
    submodules, not the root. Same function, same weights."""
    model = copy.deepcopy(model)
    if isinstance(model, nn.Linear) and type(model) is not nn.Linear:
        w = model.weight
        plain = nn.Linear(model.in_features, model.out_features, bias=model.bias is not None)
        plain = plain.to(w.device, w.dtype)
        plain.load_state_dict(model.state_dict())
        return nn.Sequential(plain)
    if type(model) is nn.Linear:
        return nn.Sequential(model)
    return model


# ---- ours ---------------------------------------------------------------------------------------


class Ours:
    """influencer itself: ``Influence(...).fit()`` (fit) then ``.scores(test)`` (score)."""

    name = "influencer"
    package = "influencer"

    def __init__(self) -> None:
        self.last_info: dict[str, Any] = {}

    def estimator(self, method: str, r: Resolved, block: bool = True):
        """Our estimator for ``method``, in its defaults where the race has no setting for it;
        ``cg`` is the default ``CG`` (block CG, as pyDVL's fastest mode) unless ``block=False``,
        which gives plain CG (independent columns, dattri's algorithm)."""
        from influencer import CG, EKFAC, KFAC, Arnoldi, Exact, Identity, LiSSA

        s = r.settings
        if method == "exact":
            return Exact(damping=s.damping)
        if method == "cg":
            return CG(damping=s.damping, tol=s.cg_tol, max_iter=s.cg_max_iter, block=block)
        if method == "lissa":
            # A fixed depth, as every peer runs it: its residual is recorded, not refused.
            return LiSSA(
                on_unconverged="warn",
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
        # The true Fisher (= Gauss-Newton matrix) in its default form: one label sampled from the
        # model per example at 10 classes, as kronfluence's default.
        if method == "kfac":
            return KFAC(damping=s.damping)
        if method == "ekfac":
            return EKFAC(damping=s.damping)
        if method == "ekfac-emp":
            return EKFAC(damping=s.damping, fisher="empirical")
        if method == "identity":
            return Identity()
        raise NotAvailableError(method)

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        from influencer import Influence

        if method == "identity-proj":
            return self.projected_store(problem, r)
        st = Stages(problem.device)
        estimator = self.estimator(method, r)
        with st("fit"):
            inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=estimator).fit()
        with st("score"):
            out = inf.scores(problem.test)
        self.last_info = dict(inf.solver.info)
        return st.result(out)

    def projected_store(self, problem: Problem, r: Resolved) -> Run:
        """``identity-proj``: the gradient store (``influencer.index``) with bergson's projection:
        Rademacher ``k x k`` per layer (random basis), no preconditioner. Fit = building the store on
        disk (a temporary directory), score = projected test gradients and their dot products."""
        from influencer import Identity, Influence
        from influencer.index import GradientIndex, KroneckerProjector, NoPreconditioner

        k = r.settings.projection_dim
        dtype = str(next(problem.model.parameters()).dtype).removeprefix("torch.")
        projector = KroneckerProjector(
            k_in=k, k_out=k, basis="random", distribution="rademacher", dtype=dtype
        )
        st = Stages(problem.device)
        with tempfile.TemporaryDirectory() as folder:
            with st("fit"):
                inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=Identity())
                index = GradientIndex.build(inf, Path(folder) / "index", projector, fisher=False)
            with st("score"):
                out = index.scores(problem.test, preconditioner=NoPreconditioner())
        return st.result(out)

    def largest_eigenvalue(self, problem: Problem, settings: Settings) -> float:
        """The Hessian's largest eigenvalue by power iteration (untimed; for LiSSA's scale where
        the problem is too large for the exact solve that otherwise gives it)."""
        from influencer import Identity, Influence

        inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=Identity()).fit()
        return inf.curvature.largest_eigenvalue(seed=settings.seed)

    def plain_cg_iterations(self, problem: Problem, r: Resolved) -> int:
        """Iterations plain CG needs on ``problem``'s test points at the tolerance (untimed): the
        fixed count dattri, which has no tolerance, must run to reach the same accuracy."""
        from influencer import Influence

        estimator = self.estimator("cg", r, block=False)
        inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=estimator).fit()
        inf.test_directions(problem.test)
        return int(inf.solver.info["iterations"])


# ---- captum -------------------------------------------------------------------------------------


class Captum:
    """captum.influence: ``NaiveInfluenceFunction`` (exact), ``ArnoldiInfluenceFunction``, ``TracInCP``.

    All in captum's batched mode: ``sample_wise_grads_per_batch=True`` with a summed loss, so
    per-example gradients of a whole batch come from one backward pass (its layer hooks; Linear and
    Conv2d only, which covers these models), the training set and the test set each in one batch.

    captum's influence score is ``grad L(test)^T H_c^-1 grad L(z_i)`` with ``H_c`` the Hessian of the
    *summed* loss over the training set, ``n H_CE``, plus ``hessian_reg I``; its sign is already
    "removal effect" (Koh & Liang's ``-I_up,loss``). With ``hessian_reg = n (weight_decay + damping)``,
    ``H_c = n (H + damping I)``, so ``theirs = (1/n) grad f^T (H + damping I)^-1 grad CE_i`` and
    ``ours = theirs - row mean`` (see the module docstring). TracInCP with one checkpoint at learning
    rate 1 is ``grad L(test)^T grad L(z_i)``: ``ours = (theirs - row mean) / n``. No CG, LiSSA or
    K-FAC in captum. Fit = constructor (Hessian / Arnoldi basis), score = ``influence(test)``.
    """

    name = "captum"
    package = "captum"

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        from captum.influence import NaiveInfluenceFunction, TracInCP
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        s = r.settings
        st = Stages(problem.device)
        common = {
            "model": plain_modules(problem.model),  # its batched hooks dispatch on exact layer types
            "train_dataset": _train_loader(problem),
            "checkpoint": "in-memory",  # weights are already in the model
            "checkpoints_load_func": lambda model, path: 1.0,
            "loss_fn": nn.CrossEntropyLoss(reduction="sum"),
            "batch_size": problem.n,
            "sample_wise_grads_per_batch": True,
            "hessian_reg": problem.n * (problem.weight_decay + s.damping),
            "hessian_inverse_tol": 0.0,  # keep every positive eigenvalue: no truncation
        }
        with st("fit"):
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
            elif method == "identity":
                # TracInCP sums over checkpoints: the model and its members (problem.members)
                states = [m.state_dict() for m in map(plain_modules, (problem.model, *problem.members))]

                def load(model: nn.Module, k: int) -> float:
                    model.load_state_dict(states[k])
                    return 1.0  # learning rate 1

                inf = TracInCP(
                    common["model"],
                    common["train_dataset"],
                    checkpoints=list(range(len(states))) if problem.members else ["in-memory"],
                    checkpoints_load_func=load if problem.members else common["checkpoints_load_func"],
                    loss_fn=common["loss_fn"],
                    batch_size=problem.n,
                    sample_wise_grads_per_batch=True,
                )
            else:
                raise NotAvailableError(method)
        with st("score"):
            theirs = inf.influence(problem.test)  # (m, n)
        scale = problem.n * (1 + len(problem.members)) if method == "identity" else 1
        return st.result(_center(theirs) / scale)


# ---- dattri -------------------------------------------------------------------------------------


class Dattri:
    """dattri: ``IFAttributorExplicit`` / ``CG`` / ``LiSSA`` / ``Arnoldi`` / ``EKFAC``, ``TracInAttributor``.

    dattri's loss is a function of the parameters, so ``Omega`` is part of it and its training
    gradients are our ``g_i``; the test target is the plain cross-entropy. ``attribute`` returns
    ``(n, m)`` = ``g_i^T (H + damping I)^-1 grad f(test)``, the removal effect unscaled:
    ``ours = theirs.T / n``. Fit = ``cache`` (the inverse-Hessian setup), score = ``attribute``.
    Quirks handled here:

    * the Hessian is taken per batch of the "full train" loader and the inverse-HVPs of the
      batches are *summed*, so that loader must hold the training set in one batch;
    * attribution recomputes the inverse-HVP for every (train batch, test batch) pair, so the
      train loader is one batch too;
    * its CG ignores ``tol`` (fixed ``max_iter`` iterations): it gets the count our plain CG needs
      to reach the tolerance (:meth:`Ours.plain_cg_iterations`);
    * its LiSSA update is ``h = v + (1 - d) h - H h / s``, i.e. ``(H + d s I)^-1``: ``d = damping / s``;
      and its LiSSA casts every data tensor to float32 (``_lissa_collate_fn``), so the loss
      casts inputs back to the model's dtype and labels back to integers;
    * its EK-FAC's Fisher comes from the task's target with the true labels: the *empirical*
      Fisher, so it is an ``ekfac-emp`` row; it has no L2 term, which its damping supplies;
    * ``TracInAttributor`` (Grad-Dot: one checkpoint, weight 1) always randomly projects the
      gradients with its constructor; the exact dot product (``identity``) is its
      ``projector_kwargs=None`` path, set after construction; ``identity-proj`` projects to as
      many dimensions as bergson's store has;
    * its EK-FAC finds layers by parameter names ``<module>.weight``, so a bare ``nn.Linear`` (our
      logistic regression) runs as ``Sequential(Linear)`` (:func:`plain_modules`);
    * it creates some tensors in torch's default dtype (the Arnoldi start vector, the score
      matrix), so it runs with the default dtype set to the model's.
    """

    name = "dattri"
    package = "dattri"

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        from dattri.algorithm import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
            TracInAttributor,
        )
        from dattri.task import AttributionTask

        s = r.settings
        st = Stages(problem.device)
        model = plain_modules(problem.model)  # its EK-FAC finds layers by parameter names "<module>.weight"
        dtype = _dtype(problem)
        wd = problem.weight_decay

        def cross_entropy(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            # The batch mean, as dattri documents: its EK-FAC multiplies it back by the batch size.
            x, y = data
            out = functional_call(model, params, (x.to(dtype),))
            return F.cross_entropy(out, y.long())

        def objective(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            penalty = sum((q * q).sum() for q in params.values())
            return cross_entropy(params, data) + 0.5 * wd * penalty

        # Its influence functions and TracIn average over checkpoints: the model and its members.
        members = [plain_modules(m).state_dict() for m in problem.members]
        task = AttributionTask(
            loss_func=objective,
            model=model,
            checkpoints=[model.state_dict(), *members] if members else model.state_dict(),
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
        elif method == "ekfac-emp":
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
        elif method in ("identity", "identity-proj"):
            projector = {
                "proj_dim": _bergson_store_dim(problem, s.projection_dim),
                "proj_max_batch_size": 32,
                "proj_seed": s.seed,
                "device": device,
            }
            att = TracInAttributor(
                task,
                weight_list=torch.ones(1 + len(problem.members), dtype=dtype),  # one per checkpoint
                normalized_grad=False,
                projector_kwargs=projector,
            )
            if method == "identity":
                att.projector_kwargs = None
        else:
            raise NotAvailableError(method)
        torch.manual_seed(s.seed)
        full = _train_loader(problem)
        test = DataLoader(TensorDataset(*problem.test), batch_size=problem.test[0].shape[0])
        with default_dtype(dtype):
            with st("fit"):
                if isinstance(att, TracInAttributor):
                    att.cache()  # TracIn's cache takes no data: it only records the checkpoints
                else:
                    att.cache(full)
            with st("score"):
                theirs = att.attribute(full, test)  # (n, m)
        return st.result(theirs.T.to(dtype) / problem.n)


# ---- pyDVL --------------------------------------------------------------------------------------


class PyDVL:
    """pyDVL: ``DirectInfluence``, ``CgInfluence``, ``LissaInfluence``, ``ArnoldiInfluence``, EK-FAC.

    pyDVL's loss is ``loss(outputs, labels)`` (mean over the batch), its Hessian is that of the
    mean loss, and ``influences(..., mode=Up)`` is ``<(H_CE + reg I)^-1 grad f(test), grad CE_i>``,
    the removal effect unscaled. With ``regularization = weight_decay + damping``:
    ``ours = (theirs - row mean) / n``. Fit = ``fit(loader)``, score = ``influences``.

    Fastest documented modes: block CG solving all right-hand sides at once
    (``solve_simultaneously=True``) with the full-data gradient kept (``precompute_grad=True``).
    Its block CG stops a column at ``||r|| <= rtol^2 ||b||`` (the tolerance is squared but compared
    with the unsquared norm), so it gets ``rtol = sqrt(cg_tol)`` to stop at our relative residual.
    Its LiSSA stops early once ``max |residual / h| < rtol``: ``rtol=0`` runs the full depth like
    the others; its minibatch is the loader's batch size. Its EK-FAC uses a label-free surrogate of
    the true Fisher (``ekfac`` row) and allocates its factors in torch's default dtype, so it runs
    with the default set to the model's (float64 works that way).
    """

    name = "pydvl"
    package = "pyDVL"

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            EkfacInfluence,
            LissaInfluence,
        )

        s = r.settings
        st = Stages(problem.device)
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
                # Its block CG stops at ||r|| <= rtol^2 ||b||: sqrt(tol) stops where ours does.
                rtol=math.sqrt(s.cg_tol),
                atol=0.0,
                maxiter=s.cg_max_iter,
                precompute_grad=True,
                solve_simultaneously=True,
                warn_on_max_iteration=False,
            )
        elif method == "lissa":
            if s.lissa_repeats != 1:
                raise NotAvailableError("pyDVL's LiSSA has no repeats")
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
            inf = EkfacInfluence(model, update_diagonal=True, hessian_regularization=reg)
        else:
            raise NotAvailableError(method)
        with default_dtype(_dtype(problem)):
            with st("fit"):
                inf = inf.fit(loader)
            with st("score"):
                theirs = inf.influences(*problem.test, *problem.train, mode=InfluenceMode.Up)  # (m, n)
        return st.result(_center(theirs) / problem.n)


# ---- kronfluence --------------------------------------------------------------------------------


def _kronfluence_task():
    from kronfluence.task import Task

    class CrossEntropy(Task):
        """Summed cross-entropy; ``sample=True`` draws labels from the model (the true Fisher)."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return CrossEntropy()


KRONFLUENCE_MAX_BATCH = 2048
KRONFLUENCE_GRADIENT_BYTES = 2**31  # its per-sample gradients of one batch: (batch, p) floats


class Kronfluence:
    """kronfluence: ``Analyzer.fit_all_factors`` (fit) then ``compute_pairwise_scores`` (score).

    Strategies ``ekfac``, ``kfac`` and ``identity`` on every ``nn.Linear`` (bias as an extra input
    column of ones, as ours). Its factors are means over examples of the per-example curvature of the
    summed cross-entropy (no L2 term), and the pairwise score is
    ``grad f(test)^T (F + damping_factor I)^-1 grad CE_i`` in the factors' eigenbasis, the removal
    effect unscaled: with ``damping_factor = weight_decay + damping`` (the L2 term's curvature is
    ``weight_decay I``, as ours adds it per layer), ``ours = (theirs - row mean) / n``. Its true
    Fisher (``ekfac``/``kfac`` rows, its default) backpropagates one label sampled from the model per
    example (ours by default too, at 10 classes: different draws), its empirical Fisher
    (``ekfac-emp``, ``use_empirical_fisher=True``) the true labels, exactly as ours with
    ``fisher="empirical"``: that row checks the mapping (``rel_ours`` ~1e-10 in float64). Every
    dtype argument is set to the problem's; factors and scores go through its on-disk store
    (a temporary directory), as in its normal use.
    """

    name = "kronfluence"
    package = "kronfluence"
    STRATEGIES: ClassVar[dict[str, tuple[str, bool]]] = {
        "ekfac": ("ekfac", False),
        "kfac": ("kfac", False),
        "ekfac-emp": ("ekfac", True),
    }

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        st = Stages(problem.device)
        test = TensorDataset(*problem.test)
        with self._fitted(method, problem, r, st) as (analyzer, train, batch, score_args), st("score"):
            scores = analyzer.compute_pairwise_scores(
                "scores",
                "factors",
                test,
                train,
                per_device_query_batch_size=len(test),
                per_device_train_batch_size=batch,
                score_args=score_args,
            )
            if scores is None:  # some versions only write them to the store
                scores = analyzer.load_pairwise_scores("scores")
        theirs = scores["all_modules"].to(problem.device, _dtype(problem))
        return st.result(_center(theirs) / problem.n)

    def self_scores(self, method: str, problem: Problem, r: Resolved, examples: int) -> Run:
        """``compute_self_scores`` of the first ``examples`` training examples (``scores`` ``(1, c)``:
        ``grad CE_i^T (F + damping_factor I)^-1 grad CE_i``, unscaled, no L2 term)."""
        st = Stages(problem.device)
        with self._fitted(method, problem, r, st) as (analyzer, train, batch, score_args), st("score"):
            scores = analyzer.compute_self_scores(
                "self",
                "factors",
                train,
                per_device_train_batch_size=batch,
                train_indices=list(range(examples)),
                score_args=score_args,
            )
            if scores is None:
                scores = analyzer.load_self_scores("self")
        return st.result(scores["all_modules"].to(problem.device, _dtype(problem))[None])

    @contextmanager
    def _fitted(self, method: str, problem: Problem, r: Resolved, st: Stages) -> Iterator[tuple[Any, ...]]:
        """An ``Analyzer`` with its factors fitted (timed as ``fit``) in a temporary store:
        ``(analyzer, train dataset, batch size, score arguments)``."""
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        if method == "identity":
            strategy, empirical = "identity", False
        elif method in self.STRATEGIES:
            strategy, empirical = self.STRATEGIES[method]
        else:
            raise NotAvailableError(method)
        s = r.settings
        dtype = _dtype(problem)
        task = _kronfluence_task()
        model = prepare_model(plain_modules(problem.model), task)
        factor_args = FactorArguments(
            strategy=strategy,
            use_empirical_fisher=empirical,
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
        )
        score_args = ScoreArguments(
            damping_factor=problem.weight_decay + s.damping,
            per_sample_gradient_dtype=dtype,
            precondition_dtype=dtype,
            score_dtype=dtype,
        )
        train = TensorDataset(*problem.train)
        # One batch for the small problems; at most 2,048 examples for the large ones, where one
        # batch of n holds (n, d_out, d_in) per-sample gradients per layer (gigabytes at p ~ 1e5),
        # and at most 2 GiB of them (256 examples in float64 at p = 1e6, where 2,048 need 16 GB)
        per_example = sum(q.numel() for q in problem.model.parameters()) * torch.finfo(dtype).bits // 8
        batch = min(problem.n, KRONFLUENCE_MAX_BATCH, max(1, KRONFLUENCE_GRADIENT_BYTES // per_example))
        torch.manual_seed(s.seed)  # its sampled labels
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer(
                "bench",
                model,
                task,
                cpu=problem.device.type == "cpu",
                disable_tqdm=True,
                output_dir=out,
                log_level=logging.WARNING,
            )
            with st("fit"):
                analyzer.fit_all_factors(
                    "factors", train, per_device_batch_size=batch, factor_args=factor_args
                )
            yield analyzer, train, batch, score_args


# ---- bergson ------------------------------------------------------------------------------------


class _Sequence(nn.Module):
    """bergson's hooks expect ``(N, S, I)`` activations (token sequences): a length-1 sequence."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, None, :])[:, 0, :]


def _bergson_store_dim(problem: Problem, k: int) -> int:
    """Width of bergson's projected store: ``k x k`` per linear layer."""
    return k * k * sum(isinstance(m, nn.Linear) for m in problem.model.modules())


class Bergson:
    """bergson: its gradient store (``GradientCollector``), full or randomly projected, and its score.

    bergson's influence pipelines (EK-FAC, TrackStar, MAGIC, ...) are built for causal language
    models (token data sets, ``model(input_ids).logits``, next-token loss), so here it runs the part
    that applies to any model of ``nn.Linear`` layers: ``GradientCollector`` hooks collect per-example
    gradients of the summed cross-entropy per layer (bias included, ``include_bias=True``), either
    exactly (``identity``) or projected two-sided to ``k x k`` per layer with its seeded Rademacher
    matrices (``identity-proj``, ``projection_dim=k``: a Johnson-Lindenstrauss estimate of the
    inner product), and scores are the inner products of test and training rows, what its
    ``score``/``query`` compute without preconditioning or unit normalisation. Fit = collecting the
    training gradients (building the store), score = test gradients + inner products.
    Mapping: ``ours = (theirs - row mean) / n``.
    """

    name = "bergson"
    package = "bergson"

    def run(self, method: str, problem: Problem, r: Resolved) -> Run:
        from bergson.collector.gradient_collectors import GradientCollector
        from bergson.config import IndexConfig
        from bergson.gradients import GradientProcessor
        from datasets import Dataset

        if method not in ("identity", "identity-proj"):
            raise NotAvailableError(method)
        s = r.settings
        st = Stages(problem.device)
        net = _Sequence(plain_modules(problem.model))
        processor = GradientProcessor(
            projection_dim=s.projection_dim if method == "identity-proj" else None,
            include_bias=True,
            projection_seed=s.seed,
        )

        def collect(x: Tensor, y: Tensor, run_path: str, batch: int = 1024) -> Tensor:
            data = Dataset.from_dict({"input_ids": [[0]] * len(x)})  # only its length is used
            collector = GradientCollector(
                model=net, cfg=IndexConfig(run_path=run_path), data=data, processor=processor, skip_index=True
            )
            names = list(collector.shapes())
            rows = []
            with collector:
                for start in range(0, len(x), batch):
                    net.zero_grad()
                    logits = net(x[start : start + batch])
                    F.cross_entropy(logits, y[start : start + batch], reduction="sum").backward()
                    rows.append(torch.cat([collector.mod_grads[k] for k in names], dim=1))
                    collector.mod_grads.clear()
            return torch.cat(rows)

        with tempfile.TemporaryDirectory() as out:
            with st("fit"):
                store = collect(*problem.train, f"{out}/train")  # (n, d)
            with st("score"):
                queries = collect(*problem.test, f"{out}/test")  # (m, d)
                theirs = queries @ store.T
        return st.result(_center(theirs.to(problem.device)) / problem.n)


LIBRARIES: dict[str, Callable[[], Any]] = {
    "influencer": Ours,
    "captum": Captum,
    "dattri": Dattri,
    "pydvl": PyDVL,
    "kronfluence": Kronfluence,
    "bergson": Bergson,
}


def chosen(
    parser: argparse.ArgumentParser, methods: str, libraries: str | None, known: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The ``--methods`` and ``--libraries`` comma lists, checked; influencer always among the
    libraries (the reference and the time ratios come from it)."""
    chosen_methods = [m for m in methods.split(",") if m]
    if unknown := set(chosen_methods) - set(known):
        parser.error(f"unknown methods {sorted(unknown)}")
    chosen_libraries = libraries.split(",") if libraries else list(LIBRARIES)
    if unknown := set(chosen_libraries) - set(LIBRARIES):
        parser.error(f"unknown libraries {sorted(unknown)}")
    if "influencer" not in chosen_libraries:
        chosen_libraries.insert(0, "influencer")
    return chosen_methods, chosen_libraries


PACKAGE_MODULES = {
    "influencer": ("influencer",),
    "captum": ("captum.influence",),
    "dattri": ("dattri.algorithm", "dattri.task"),
    "pydvl": ("pydvl.influence.torch",),
    "kronfluence": ("kronfluence.analyzer",),
    "bergson": ("bergson", "datasets"),
}


def preload(libraries: list[str]) -> None:
    """Import every library before anything is timed, then exempt what exists from the collector.

    Some libraries call ``gc.collect()`` in every stage (kronfluence: several per call), whose cost
    grows with every live Python object in the process, including the other libraries' modules
    (bergson alone brings transformers and datasets). ``gc.freeze()`` moves everything that exists
    now into a permanent generation the collector skips, so each library pays for its own objects
    only, as in a process of its own. Call it again after building a problem.
    """
    import contextlib
    import gc
    import importlib

    logging.getLogger("pydvl").setLevel(logging.WARNING)  # pyDVL logs every fit at INFO
    for lib in libraries:
        for module in PACKAGE_MODULES.get(lib, ()):
            with contextlib.suppress(ImportError):  # reported as that library's error in its rows
                importlib.import_module(module)
    gc.collect()
    gc.freeze()


def largest_eigenvalue_bound(max_eigenvalue: float) -> float:
    """LiSSA's scale from the largest eigenvalue of ``H + damping I``: 1.5x, as ours defaults to."""
    if not math.isfinite(max_eigenvalue) or max_eigenvalue <= 0:
        raise ValueError(f"largest eigenvalue must be finite and positive, got {max_eigenvalue}")
    return 1.5 * max_eigenvalue
