"""The fast paths give the same numbers as the plain ones.

Reverse-mode and forward-mode curvature products, linearised batches kept between products,
the resident Hessian set LiSSA samples from, the regulariser entering scores as a rank-one
shift, cheap finite checks, and layer-wise scores for Kronecker solvers: each is checked against
the straightforward computation it replaces.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from influencer import (
    CG,
    EKFAC,
    KFAC,
    Arnoldi,
    BlockCG,
    ClassificationTask,
    Exact,
    Identity,
    Influence,
    LiSSA,
)
from influencer._kernel import curvature as curvature_module
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.errors import ConfigError, ConvergenceError, IndefiniteHessianError, NonFiniteError
from influencer.estimators import Curvature, layer_scores
from influencer.estimators.layer_scores import LayerScorer
from influencer.models import MLP


class QuarticPenalty(ClassificationTask):
    """A regulariser whose Hessian is not a multiple of the identity (differentiated twice)."""

    def regularizer(self, params):
        return 1e-3 * sum((p**4).sum() for p in params.values())


def dense_autograd_hessian(fn: ModelFunction, batch, weight: float) -> torch.Tensor:
    """``weight * Hessian of sum_i loss_i`` by double backward, row by row (no torch.func)."""
    theta = fn.theta0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(weight * fn.loss(theta, batch).sum(), theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g[k], theta, retain_graph=True)[0] for k in range(fn.p)])


@pytest.fixture(scope="module")
def mlp_fn(digits_small, mlp_small) -> ModelFunction:
    model, task = mlp_small
    return ModelFunction(model, task)


def test_reverse_and_forward_products_agree_with_the_dense_hessian(digits_small):
    torch.manual_seed(0)
    fn = ModelFunction(MLP(64, (6,), 4).double(), ClassificationTask(weight_decay=0.1))
    batch = (digits_small.x_train[:30], digits_small.y_train[:30] % 4)
    h = dense_autograd_hessian(fn, batch, 1 / 30)
    v = torch.randn(5, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for mode in ("reverse", "forward"):
        torch.testing.assert_close(
            fn.hvp(fn.theta0, batch, v, 1 / 30, mode=mode), v @ h, rtol=1e-10, atol=1e-12
        )
        # a single vector takes the unbatched backward pass
        torch.testing.assert_close(
            fn.hvp(fn.theta0, batch, v[:1], 1 / 30, mode=mode), v[:1] @ h, rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
@pytest.mark.parametrize(
    "task", [ClassificationTask(weight_decay=1e-2), QuarticPenalty()], ids=["l2", "quartic"]
)
def test_both_modes_build_the_same_dense_curvature(digits_small, mlp_small, kind, task):
    model, _ = mlp_small
    fn = ModelFunction(model, task)
    data = as_examples(digits_small.train)
    dense = {
        mode: Curvature(fn, fn.theta0, data, kind=kind, batch_size=70, hvp=mode).dense()
        for mode in ("reverse", "forward")
    }
    scale = float(dense["forward"].abs().max())
    torch.testing.assert_close(dense["reverse"], dense["forward"], rtol=0, atol=1e-10 * scale)


def test_gauss_newton_reverse_product_matches_explicit_jacobians(digits_small):
    torch.manual_seed(2)
    fn = ModelFunction(MLP(64, (4,), 3).double(), ClassificationTask())
    x, y = digits_small.x_train[:6], digits_small.y_train[:6] % 3
    theta = fn.theta0
    jac = torch.func.jacrev(lambda t: fn.outputs(t, (x, y)))(theta).reshape(6 * 3, fn.p)  # (B*C, p)
    probs = torch.softmax(fn.outputs(theta, (x, y)), dim=1).detach()
    h_out = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in probs])  # CE Hessian in logits
    ggn = jac.T @ h_out @ jac / 6
    v = torch.randn(3, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    product = fn.ggn_vp(theta, (x, y), v, 1 / 6, mode="reverse")
    torch.testing.assert_close(product, v @ ggn, rtol=1e-10, atol=1e-12)


def test_kept_linearisations_are_reused_and_equal_fresh_ones(digits_small, mlp_fn, monkeypatch):
    data = as_examples(digits_small.train)
    v = torch.randn(4, mlp_fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kept = Curvature(mlp_fn, mlp_fn.theta0, data, batch_size=64)
    first = kept.matvec(v)
    assert kept._linearized is not None and len(kept._linearized) == 5  # 300 examples / 64
    assert all(lin.nbytes > 0 for lin in kept._linearized)
    built = []
    monkeypatch.setattr(mlp_fn, "linearize", lambda *a, **k: built.append(1))  # must not be called again
    second = kept.matvec(v)
    monkeypatch.undo()
    assert not built
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    # Graphs over the budget are not kept: every product rebuilds them, with the same result.
    monkeypatch.setattr(curvature_module, "_CACHE_BYTES", 10_000)
    fresh = Curvature(mlp_fn, mlp_fn.theta0, data, batch_size=64)
    torch.testing.assert_close(fresh.matvec(v), first, rtol=1e-12, atol=1e-15)
    assert fresh._linearized is None
    torch.testing.assert_close(fresh.matvec(v), first, rtol=1e-12, atol=1e-15)
    forward = Curvature(mlp_fn, mlp_fn.theta0, data, batch_size=64, hvp="forward")
    torch.testing.assert_close(forward.matvec(v), first, rtol=1e-10, atol=1e-12)
    assert forward._linearized is None


def test_unknown_hvp_mode_is_refused(digits_small, mlp_fn, mlp_small):
    with pytest.raises(ConfigError, match="hvp must be one of"):
        Curvature(mlp_fn, mlp_fn.theta0, as_examples(digits_small.train), hvp="sideways")
    with pytest.raises(ConfigError, match="hvp must be one of"):
        Influence(*mlp_small, digits_small.train, hvp="backward")


class Pairs(Dataset):
    """The same examples as a map-style dataset: batches take the collate path, not the tensor one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.mark.filterwarnings("ignore:LiSSA did not converge:RuntimeWarning")  # a short series, on purpose
def test_lissa_minibatches_from_the_resident_set_equal_fresh_ones(digits_small, logistic_small):
    model, task = logistic_small
    fn = ModelFunction(model, task)
    x, y = digits_small.train
    subset = torch.arange(7, 300, 2)
    v = torch.randn(3, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # 40 steps do not converge (and need not: the two sources must give the same iterates)
    estimator = LiSSA(depth=40, batch_size=16, scale=5.0, damping=0.01, on_unconverged="warn")
    resident = Curvature(fn, fn.theta0, as_examples((x, y)), subset)
    streamed = Curvature(fn, fn.theta0, as_examples(Pairs(x, y)), subset)
    a = estimator.fit(resident).solve(v)
    b = estimator.fit(streamed).solve(v)
    assert resident._resident is not None and streamed._resident is None
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "estimator", [CG(damping=0.01, tol=1e-10), Arnoldi(rank=40, iterations=80, damping=0.01)]
)
@pytest.mark.filterwarnings("ignore:Arnoldi with rank:RuntimeWarning")  # rank 40 of 650, on purpose
def test_iterative_solvers_give_the_same_answer_in_both_modes(digits_small, logistic_small, estimator):
    model, task = logistic_small
    fn = ModelFunction(model, task)
    data = as_examples(digits_small.train)
    v = torch.randn(3, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rev, fwd = (estimator.fit(Curvature(fn, fn.theta0, data, hvp=m)).solve(v) for m in ("reverse", "forward"))
    torch.testing.assert_close(rev, fwd, rtol=1e-8, atol=1e-10)


# ---- scores: regulariser as a rank-one shift, finite checks --------------------------------------


@pytest.mark.parametrize(
    "task", [ClassificationTask(weight_decay=1e-2), QuarticPenalty()], ids=["l2", "quartic"]
)
def test_scores_with_the_regulariser_as_a_shift_equal_explicit_gradients(digits_small, mlp_small, task):
    model, _ = mlp_small
    inf = Influence(model, task, digits_small.train, estimator=Exact(damping=0.5)).fit()
    directions = inf.test_directions((digits_small.x_test[:4], digits_small.y_test[:4]))
    explicit = torch.cat([directions @ g.T for _, g in inf.train_gradients()], dim=1) / inf.n
    torch.testing.assert_close(inf.scores_from_directions(directions), explicit, rtol=1e-10, atol=1e-14)
    # the public per-example gradients still include grad Omega, and self-influence uses both forms
    loss_only = inf.fn.example_loss_grads(inf.theta, inf.fn.prepare(inf.train.take(torch.arange(5))))
    reg = inf.fn.regularizer_grad(inf.theta)
    assert float(reg.norm()) > 0
    g5 = next(inf.train_gradients(torch.arange(5)))[1]
    torch.testing.assert_close(g5, loss_only + reg, rtol=1e-12, atol=1e-15)
    expected = (loss_only * inf.inverse_hvp(g5)).sum(1) / inf.n
    torch.testing.assert_close(inf.self_influence(torch.arange(5)), expected, rtol=1e-10, atol=1e-15)


def test_finite_check_names_bad_rows_and_lets_large_finite_rows_through(digits_small, logistic_small):
    inf = Influence(*logistic_small, digits_small.train)
    ids = torch.tensor([10, 11, 12])
    big = torch.tensor([[1e308, 1e308, 1.0], [1.0, 2.0, 3.0], [-1e308, -1e308, 0.0]], dtype=torch.float64)
    assert inf._checked(big, ids, "training-loss") is big  # the row sums overflow; the rows are fine
    bad = big.clone()
    bad[1, 2] = float("nan")
    bad[2, 0] = float("-inf")
    with pytest.raises(
        NonFiniteError, match=r"training-loss gradient is NaN or infinite for example\(s\) \[11, 12\]"
    ):
        inf._checked(bad, ids, "training-loss")


@pytest.mark.parametrize("estimator", [Exact(damping=0.1), EKFAC(damping=0.1)], ids=["per-example", "layers"])
def test_scores_name_training_examples_with_non_finite_gradients(digits_small, logistic_small, estimator):
    x, y = digits_small.train
    inf = Influence(*logistic_small, (x.clone(), y), estimator=estimator).fit()
    directions = inf.test_directions((digits_small.x_test[:2], digits_small.y_test[:2]))
    inf.train.tree[0][[41, 100], 3] = float("inf")  # after fitting: only the scoring pass sees them
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[41, 100\]"):
        inf.scores_from_directions(directions)


# ---- layer-wise scores for Kronecker solvers -----------------------------------------------------


class TwiceUsed(nn.Module):
    """One linear layer applied twice (two calls, one position each), then a bias-only head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)
    )


@pytest.mark.parametrize(
    ("make", "params"),
    [
        (lambda: MLP(6, (17, 2), 3), None),  # wide and narrow layers (d_in >= d_out and d_in < d_out)
        (conv_net, None),  # several positions per example
        (TwiceUsed, None),  # a layer called twice
        (TwiceUsed, ["shared", "head.bias"]),  # a bias-only block
    ],
    ids=["mlp", "conv", "shared", "bias-only"],
)
@pytest.mark.parametrize("kind", [EKFAC, KFAC])
@pytest.mark.filterwarnings("ignore:the task's regularizer Hessian is not a multiple")
def test_layer_scores_equal_per_example_gradient_scores(make, params, kind):
    torch.manual_seed(0)
    x, y = torch.randn(90, 6, dtype=torch.float64), torch.randint(0, 3, (90,))
    model = make().double()
    inf = Influence(
        model, QuarticPenalty(), (x, y), estimator=kind(damping=0.1), params=params, batch_size=32
    ).fit()
    directions = inf.test_directions((x[:5], y[:5]))
    explicit = torch.cat([directions @ g.T for _, g in inf.train_gradients()], dim=1) / inf.n
    torch.testing.assert_close(inf.scores_from_directions(directions), explicit, rtol=1e-10, atol=1e-14)
    subset = torch.tensor([80, 3, 3, 57])
    torch.testing.assert_close(
        inf.scores_from_directions(directions, subset), explicit[:, subset], rtol=1e-10, atol=1e-14
    )


class MarginMeasurement(QuarticPenalty):
    """A measurement other than the loss (the gradient dot product's directions are its gradients)."""

    def measurement(self, model, batch):
        logits = self.outputs(model, batch)
        return logits.gather(1, batch[1][:, None])[:, 0] - logits.logsumexp(1)


@pytest.mark.parametrize(
    ("make", "params"),
    [
        (lambda: MLP(6, (17, 2), 3), None),
        (conv_net, None),
        (TwiceUsed, None),
        (TwiceUsed, ["shared", "head.bias"]),
    ],
    ids=["mlp", "conv", "shared", "bias-only"],
)
@pytest.mark.parametrize("factored", [True, False, None], ids=["rows", "blocks", "by-cost"])
def test_gradient_dot_products_from_layer_rows_equal_per_example_gradients(
    make, params, factored, monkeypatch
):
    # Identity keeps the test gradients as layer rows; each layer contracts them with the training
    # rows directly ("ghost" dot products) or through dense blocks, whichever costs less (forced here).
    if factored is not None:
        monkeypatch.setattr(layer_scores, "_factored_cheaper", lambda *a: factored)
    torch.manual_seed(0)
    x, y = torch.randn(90, 6, dtype=torch.float64), torch.randint(0, 3, (90,))
    inf = Influence(
        make().double(), MarginMeasurement(), (x, y), estimator=Identity(), params=params, batch_size=32
    )
    inf.fit()
    test = (x[:40], y[:40])  # more test points than the chunk and than any layer's smaller side
    inf.batch_size = 16
    explicit = inf.gradients(test) @ torch.cat([g for _, g in inf.train_gradients()]).T / inf.n
    torch.testing.assert_close(inf.scores(test), explicit, rtol=1e-10, atol=1e-14)
    subset = torch.tensor([80, 3, 3, 57])
    torch.testing.assert_close(inf.scores(test, subset), explicit[:, subset], rtol=1e-10, atol=1e-14)


def test_gradient_dot_products_name_bad_test_examples_and_fall_back_outside_the_layers():
    torch.manual_seed(0)
    x, y = torch.randn(60, 4, dtype=torch.float64), torch.randint(0, 2, (60,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inf = Influence(model, ClassificationTask(weight_decay=0.1), (x, y), estimator=Identity()).fit()
    bad = x[:3].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[1\]"):
        inf.scores((bad, y[:3]))

    class WeightInMeasurement(ClassificationTask):
        def measurement(self, model, batch):
            return super().measurement(model, batch) + 0.1 * model[0].weight.sum() * batch[0][:, 0]

    class WeightInLoss(ClassificationTask):
        def loss(self, model, batch):
            return super().loss(model, batch) + 0.1 * model[0].weight.sum() * batch[0][:, 0]

        def measurement(self, model, batch):
            return ClassificationTask.loss(self, model, batch)

    # the test rows fail the layer check, or the training rows do: per-example gradients either way
    for task in (WeightInMeasurement(weight_decay=0.1), WeightInLoss(weight_decay=0.1)):
        inf.fn.task = task
        explicit = inf.gradients((x[:3], y[:3])) @ torch.cat([g for _, g in inf.train_gradients()]).T / inf.n
        torch.testing.assert_close(inf.scores((x[:3], y[:3])), explicit, rtol=1e-10, atol=1e-14)


def test_layer_scores_fall_back_when_the_loss_reaches_weights_outside_the_layers():
    class WeightInLoss(ClassificationTask):
        """The loss itself (not the regulariser) uses a weight directly: no layer sees that part."""

        def loss(self, model, batch):
            return super().loss(model, batch) + 0.1 * model[0].weight.sum() * batch[0][:, 0]

    torch.manual_seed(0)
    x, y = torch.randn(60, 4, dtype=torch.float64), torch.randint(0, 2, (60,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inf = Influence(model, ClassificationTask(weight_decay=0.1), (x, y), estimator=EKFAC(damping=0.1)).fit()
    directions = inf.test_directions((x[:3], y[:3]))
    # Fitting verified the layer model on the outputs; a loss that also reaches a weight directly
    # is caught on the first scoring chunk, and the scores come from per-example gradients.
    inf.fn.task = WeightInLoss(weight_decay=0.1)
    scorer = LayerScorer(inf.fn, inf.solver.layers, directions)
    assert scorer(inf.theta, inf.fn.prepare(inf.train.take(torch.arange(8)))) is None
    explicit = torch.cat([directions @ g.T for _, g in inf.train_gradients()], dim=1) / inf.n
    torch.testing.assert_close(inf.scores_from_directions(directions), explicit, rtol=1e-10, atol=1e-14)


# ---- block conjugate gradient --------------------------------------------------------------------


@pytest.fixture(scope="module")
def logistic_curvature(digits_small, logistic_small) -> Curvature:
    fn = ModelFunction(*logistic_small)
    return Curvature(fn, fn.theta0, as_examples(digits_small.train), batch_size=128)


def test_block_cg_solves_the_damped_system_in_fewer_iterations(logistic_curvature):
    rhs = torch.randn(
        6, logistic_curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    rhs[4] = rhs[1]  # a repeated column: the search block loses rank and must drop a direction
    rhs[5] = 0.0  # a zero column is solved at once
    exact = Exact(damping=0.01).fit(logistic_curvature).solve(rhs)
    single = CG(damping=0.01, tol=1e-10, block=False).fit(logistic_curvature)
    block = BlockCG(damping=0.01, tol=1e-10).fit(logistic_curvature)
    x = block.solve(rhs)
    assert float((x - exact).norm() / exact.norm()) < 1e-8
    assert block.info["max_relative_residual"] <= 1e-10
    torch.testing.assert_close(x[5], torch.zeros_like(x[5]))
    single.solve(rhs)
    assert block.info["iterations"] < single.info["iterations"]
    expected = {
        "estimator": "block_cg", "damping": 0.01, "tol": 1e-10, "max_iter": 200, "on_unconverged": "raise",
    }  # fmt: skip
    assert block.config.settings() == expected
    # one column alone is plain CG (with normalised directions): the same answer
    torch.testing.assert_close(block.solve(rhs[2:3]), single.solve(rhs[2:3]), rtol=1e-8, atol=1e-12)


def test_block_cg_refuses_negative_curvature_and_stops_at_max_iter(
    digits_small, mlp_small, logistic_curvature
):
    fn = ModelFunction(*mlp_small)
    curv = Curvature(fn, fn.theta0, as_examples(digits_small.train))
    v = torch.randn(3, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with pytest.raises(IndefiniteHessianError, match="negative curvature"):
        BlockCG().fit(curv).solve(v)
    rhs = torch.randn(
        4, logistic_curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    with pytest.raises(ConvergenceError, match="max_iter=3"):
        BlockCG(max_iter=3).fit(logistic_curvature).solve(rhs)
    with pytest.warns(RuntimeWarning, match="max_iter=3"):
        BlockCG(max_iter=3, on_unconverged="warn").fit(logistic_curvature).solve(rhs)


def test_block_cg_on_a_network_equals_the_dense_solve_for_any_hessian_chunking(digits_small, mlp_fn):
    """Block CG on the Gauss-Newton matrix of an MLP (what benchmarks race as "cg"): equal to the
    dense float64 solve at the tolerance whether the Hessian set is one chunk or five, in fewer
    iterations than CG (whose per-column answers it matches to the same level)."""
    data = as_examples(digits_small.train)
    rhs = mlp_fn.measurement_grads(mlp_fn.theta0, mlp_fn.prepare(digits_small.test))[:8]  # (8, p)
    chunked = Curvature(mlp_fn, mlp_fn.theta0, data, kind="gauss_newton", batch_size=64)
    whole = Curvature(mlp_fn, mlp_fn.theta0, data, kind="gauss_newton", batch_size=300)
    exact = Exact(damping=1e-3).fit(whole).solve(rhs)
    iterations = []
    for curvature in (chunked, whole):
        solver = BlockCG(damping=1e-3, tol=1e-10, max_iter=1000).fit(curvature)
        x = solver.solve(rhs)
        assert solver.info["converged"] and solver.info["max_relative_residual"] <= 1e-10
        torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-7 * float(exact.abs().max()))
        iterations.append(solver.info["iterations"])
    single = CG(damping=1e-3, tol=1e-10, max_iter=1000, block=False).fit(whole)
    torch.testing.assert_close(single.solve(rhs), exact, rtol=1e-6, atol=1e-7 * float(exact.abs().max()))
    assert max(iterations) < single.info["iterations"]
    assert abs(iterations[0] - iterations[1]) <= 2  # chunking changes only the rounding


def per_column_cg(**options) -> CG:
    return CG(block=False, **options)


@pytest.mark.parametrize("estimator", [per_column_cg, CG, BlockCG])
def test_kfac_preconditioned_cg_equals_the_dense_solve_in_fewer_iterations(
    digits_small, mlp_fn, logistic_curvature, estimator
):
    """Preconditioning changes the iterations, never the answer: on a logistic regression (where
    K-FAC is close to the Hessian) it takes far fewer; on an MLP's Gauss-Newton matrix (where it is
    not) it still converges to the dense solve."""
    mlp_curvature = Curvature(
        mlp_fn, mlp_fn.theta0, as_examples(digits_small.train), kind="gauss_newton", batch_size=128
    )
    iterations = {}
    for name, curvature in (("logistic", logistic_curvature), ("mlp", mlp_curvature)):
        rhs = torch.randn(6, curvature.p, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        exact = Exact(damping=1e-3).fit(curvature).solve(rhs)
        for pre in (None, KFAC(damping=1e-3)):
            solver = estimator(damping=1e-3, tol=1e-10, max_iter=1000, preconditioner=pre).fit(curvature)
            x = solver.solve(rhs)
            assert solver.info["converged"] and solver.info["max_relative_residual"] <= 1e-10
            torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-7 * float(exact.abs().max()))
            iterations[name, pre is not None] = solver.info["iterations"]
    assert iterations["logistic", True] < iterations["logistic", False]
    pre = estimator(damping=1e-3, preconditioner=KFAC(damping=1e-3))
    assert pre.settings()["preconditioner"] == KFAC(damping=1e-3).settings()
    assert "preconditioner" not in estimator().settings()  # unpreconditioned fingerprints unchanged


def test_cg_refuses_a_preconditioner_that_is_not_a_fixed_linear_solve():
    with pytest.raises(ConfigError, match="preconditioner must be an estimator"):
        CG(preconditioner="kfac")
    for iterative in (CG(), LiSSA()):
        with pytest.raises(ConfigError, match="fixed linear solve"):
            BlockCG(preconditioner=iterative)
    with pytest.raises(ConfigError, match=r"use CG\(block=False\)"):
        BlockCG(block=False)
    with pytest.raises(ConfigError, match="block must be True or False"):
        CG(block="yes")
