"""Inverse-HVP estimators against a dense float64 solve, and their failure modes."""

from __future__ import annotations

import pytest
import torch

from influencer import CG, Arnoldi, Exact, Identity, LiSSA
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.errors import ConfigError, ConvergenceError, IndefiniteHessianError
from influencer.estimators import Curvature


@pytest.fixture(scope="module")
def logistic_curvature(digits_small, logistic_small) -> Curvature:
    model, task = logistic_small
    fn = ModelFunction(model, task)
    return Curvature(fn, fn.theta0, as_examples(digits_small.train), batch_size=128)


@pytest.fixture(scope="module")
def dense_h(logistic_curvature) -> torch.Tensor:
    return logistic_curvature.dense()


@pytest.fixture(scope="module")
def rhs(logistic_curvature) -> torch.Tensor:
    return torch.randn(
        6, logistic_curvature.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_dense_hessian_is_symmetric_and_matches_products(logistic_curvature, dense_h, rhs):
    assert dense_h.shape == (650, 650)
    torch.testing.assert_close(dense_h, dense_h.T)
    torch.testing.assert_close(logistic_curvature.matvec(rhs), rhs @ dense_h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_exact_solves_the_damped_system(logistic_curvature, dense_h, rhs, damping):
    x = Exact(damping=damping).fit(logistic_curvature).solve(rhs)
    a = dense_h + damping * torch.eye(650, dtype=torch.float64)
    torch.testing.assert_close(x, torch.linalg.solve(a, rhs.T).T, rtol=1e-9, atol=1e-10)


def test_cg_agrees_with_exact_to_1e_6(logistic_curvature, rhs):
    exact = Exact().fit(logistic_curvature).solve(rhs)
    solver = CG(tol=1e-10, block=False).fit(logistic_curvature)
    x = solver.solve(rhs)
    assert rel_err(x, exact) < 1e-6
    assert solver.info["max_relative_residual"] <= 1e-10
    # Each right-hand side is its own CG run: solving one column alone gives the same answer.
    torch.testing.assert_close(solver.solve(rhs[2:3]), x[2:3], rtol=1e-8, atol=1e-12)


def test_default_cg_is_block_cg_with_the_per_column_answers(logistic_curvature, dense_h, rhs):
    """``CG()`` solves all right-hand sides as one block: against a dense float64 solve it is as
    accurate as independent per-column runs at the same tolerance, in fewer iterations."""
    damping = 1e-3
    a = dense_h + damping * torch.eye(dense_h.shape[0], dtype=torch.float64)
    dense = torch.linalg.solve(a, rhs.T).T  # (k, p)
    default, columns = CG(damping=damping, tol=1e-10), CG(damping=damping, tol=1e-10, block=False)
    assert default.block and default.settings()["block"] is True
    block_solver, column_solver = default.fit(logistic_curvature), columns.fit(logistic_curvature)
    x_block, x_columns = block_solver.solve(rhs), column_solver.solve(rhs)
    for x in (x_block, x_columns):
        # A relative residual of 1e-10 bounds the error by cond(A) * 1e-10 per column.
        residual = (x @ a - rhs).norm(dim=1) / rhs.norm(dim=1)
        assert float(residual.max()) <= 1e-10 * 1.01
        assert float(((x - dense).norm(dim=1) / dense.norm(dim=1)).max()) < 1e-6
    torch.testing.assert_close(x_block, x_columns, rtol=1e-6, atol=1e-6 * float(dense.abs().max()))
    assert block_solver.info["iterations"] < column_solver.info["iterations"]


def test_cg_that_runs_out_of_iterations_is_an_error_unless_accepted(logistic_curvature, rhs):
    with pytest.raises(
        ConvergenceError, match=r"CG did not converge: after max_iter=3 .*raise max_iter"
    ) as info:
        CG(max_iter=3).fit(logistic_curvature).solve(rhs)
    assert "on_unconverged='warn'" in str(info.value)
    solver = CG(max_iter=3, on_unconverged="warn").fit(logistic_curvature)
    with pytest.warns(RuntimeWarning, match="max_iter=3.*the scores are approximate"):
        solver.solve(rhs)
    assert solver.info["converged"] is False and solver.info["max_relative_residual"] > 1e-8


def test_lissa_with_full_batches_is_the_truncated_neumann_series(logistic_curvature, dense_h, rhs):
    """With every step on all examples LiSSA is deterministic: h/scale = sum_j (I - A/s)^j v / s."""
    depth, scale, damping = 30, 2.0, 0.01
    est = LiSSA(depth=depth, scale=scale, damping=damping, batch_size=10_000, on_unconverged="warn")
    with pytest.warns(RuntimeWarning, match="LiSSA did not converge"):  # 30 steps are too few
        x = est.fit(logistic_curvature).solve(rhs[:2])
    a = dense_h + damping * torch.eye(650, dtype=torch.float64)
    step = torch.eye(650, dtype=torch.float64) - a / scale
    term, total = rhs[:2].T.clone(), rhs[:2].T.clone()
    for _ in range(depth):
        term = step @ term
        total += term
    torch.testing.assert_close(x, (total / scale).T, rtol=1e-9, atol=1e-12)


def test_lissa_converges_to_exact_and_repeats_reduce_noise(logistic_curvature, rhs):
    exact = Exact(damping=0.01).fit(logistic_curvature).solve(rhs[:3])
    one = LiSSA(depth=150, batch_size=100, damping=0.01, seed=1).fit(logistic_curvature).solve(rhs[:3])
    many = (
        LiSSA(depth=150, batch_size=100, damping=0.01, seed=1, repeats=3)
        .fit(logistic_curvature)
        .solve(rhs[:3])
    )
    corr = torch.corrcoef(torch.stack([one.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.95
    assert rel_err(many, exact) < rel_err(one, exact)


def test_lissa_is_invariant_to_how_columns_are_grouped(logistic_curvature, rhs):
    # (50 steps are too few to converge here: accepted, since grouping is what is tested)
    solver = LiSSA(depth=50, batch_size=32, damping=0.01, on_unconverged="warn").fit(logistic_curvature)
    with pytest.warns(RuntimeWarning, match="LiSSA did not converge"):
        torch.testing.assert_close(solver.solve(rhs[1:2]), solver.solve(rhs)[1:2])


def test_lissa_with_too_small_a_scale_diverges_with_a_clear_error(logistic_curvature, rhs):
    with pytest.raises(ConvergenceError, match="Increase scale"):
        LiSSA(depth=500, scale=0.05, batch_size=64).fit(logistic_curvature).solve(rhs[:1])


def test_lissa_checks_its_error_with_the_full_curvature(logistic_curvature, dense_h, rhs):
    solver = LiSSA(depth=150, batch_size=100, damping=0.01, seed=1).fit(logistic_curvature)
    x = solver.solve(rhs[:3])
    a = dense_h + 0.01 * torch.eye(650, dtype=torch.float64)
    expected = float(((x @ a - rhs[:3]).norm(dim=1) / rhs[:3].norm(dim=1)).max())
    assert solver.info["max_relative_residual"] == pytest.approx(expected, rel=1e-9)
    # the estimated A-norm error is close to the true one (within 25%)
    e = x - torch.linalg.solve(a, rhs[:3].T).T
    true = float((((e @ a) * e).sum(1) / ((x @ a) * x).sum(1)).sqrt().max())
    assert solver.info["estimated_error"] == pytest.approx(true, rel=0.25)
    assert solver.info["converged"] is True and solver.info["estimated_error"] < 0.5
    with pytest.raises(
        ConvergenceError,
        match=r"LiSSA did not converge: the estimated relative error of its answer is .* > tol=0.01",
    ):
        LiSSA(depth=150, batch_size=100, damping=0.01, seed=1, tol=0.01).fit(logistic_curvature).solve(
            rhs[:3]
        )
    too_short = LiSSA(depth=3, batch_size=100, damping=0.01, on_unconverged="warn").fit(logistic_curvature)
    with pytest.warns(
        RuntimeWarning, match=r"after depth=3 steps .*raise depth to at least \d+, raise damping"
    ):
        too_short.solve(rhs[:1])
    assert too_short.info["converged"] is False


class DenseCurvature:
    """A curvature with a known spectrum: ``Q diag(eigenvalues) Q^T`` (every product exact)."""

    def __init__(self, eigenvalues: list[float], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(
            torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64)
        )
        self.matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
        self.p = len(eigenvalues)
        self.theta = torch.zeros(self.p, dtype=torch.float64)

    def matvec(self, v):
        return v @ self.matrix

    def sample_matvec(self, v, generator, batch_size):
        return self.matvec(v)

    def largest_eigenvalue(self, seed=0, **_):
        evals = torch.linalg.eigvalsh(self.matrix)
        return float(evals[evals.abs().argmax()])


def test_lissa_refuses_negative_curvature():
    """An eigenvalue of -0.005 among 0.1..1: undamped, the series grows along it instead of
    converging, and the estimate's own curvature x^T (H + damping I) x certifies it."""
    curvature = DenseCurvature([-0.005, *torch.linspace(0.1, 1.0, 19).tolist()])
    v = torch.ones(2, 20, dtype=torch.float64)
    with pytest.raises(IndefiniteHessianError, match=r"LiSSA met negative curvature: x\^T \(H \+ 0 I\) x"):
        LiSSA(depth=300).fit(curvature).solve(v)
    # Damping that makes H + damping I positive definite: accepted, and correct.
    x = LiSSA(depth=2000, damping=0.2).fit(curvature).solve(v)
    exact = torch.linalg.solve(curvature.matrix + 0.2 * torch.eye(20, dtype=torch.float64), v.T).T
    assert rel_err(x, exact) < 1e-6
    # A largest-magnitude eigenvalue that is negative is refused when the scale is found.
    with pytest.raises(IndefiniteHessianError, match=r"eigenvalue of about -2, .* pass damping > 2"):
        LiSSA().fit(DenseCurvature([-2.0, 0.5, 1.0]))


def test_arnoldi_full_rank_is_exact_despite_repeated_eigenvalues():
    """Softmax regression's Hessian has an eigenvalue repeated ~p/C times (the shared logit shift
    only sees the L2 term); a Krylov basis restarted at breakdown still spans everything."""
    from influencer import ClassificationTask
    from influencer.datasets import load_tabular
    from influencer.models import LogisticRegression

    wine = load_tabular("wine", dtype=torch.float64)
    fn = ModelFunction(LogisticRegression(13, 3).double(), ClassificationTask(weight_decay=0.1))
    curv = Curvature(fn, fn.theta0, as_examples(wine.train))
    h = curv.dense()
    assert (torch.linalg.eigvalsh(h) - 0.1).abs().lt(1e-9).sum() >= 10  # repeated eigenvalue 0.1
    v = torch.randn(3, fn.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = Arnoldi(rank=fn.p, iterations=fn.p).fit(curv)
    torch.testing.assert_close(solver.solve(v), torch.linalg.solve(h, v.T).T, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Arnoldi with rank:RuntimeWarning")  # rank 10 of 650, on purpose
def test_arnoldi_low_rank_is_the_top_eigenspace(logistic_curvature, dense_h, rhs):
    evals, evecs = torch.linalg.eigh(dense_h)
    solver = Arnoldi(rank=10, iterations=120, damping=0.1).fit(logistic_curvature)
    vals, vecs = evals[-10:], evecs[:, -10:]
    torch.testing.assert_close(solver.values.sort().values, vals, rtol=1e-8, atol=1e-10)
    expected = ((rhs @ vecs) / (vals + 0.1)) @ vecs.T
    torch.testing.assert_close(solver.solve(rhs), expected, rtol=1e-6, atol=1e-8)


def test_identity_returns_the_vectors(logistic_curvature, rhs):
    torch.testing.assert_close(Identity().fit(logistic_curvature).solve(rhs), rhs)


def test_indefinite_hessian_without_damping_is_refused(digits_small, mlp_small):
    model, task = mlp_small
    fn = ModelFunction(model, task)
    curv = Curvature(fn, fn.theta0, as_examples(digits_small.train))
    h = curv.dense()
    lo = float(torch.linalg.eigvalsh(h)[0])
    assert lo < 0, "fixture expected to have negative curvature"
    with pytest.raises(IndefiniteHessianError, match="damping"):
        Exact().fit(curv)
    with pytest.raises(IndefiniteHessianError, match="damping"):
        CG().fit(curv).solve(torch.linalg.eigh(h).eigenvectors[:, :1].T)
    # enough damping makes it well posed, and Gauss-Newton is positive semi-definite
    Exact(damping=-2 * lo).fit(curv)
    ggn = Curvature(fn, fn.theta0, as_examples(digits_small.train), kind="gauss_newton")
    assert float(torch.linalg.eigvalsh(ggn.dense())[0]) > -1e-10


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CG(damping=-1.0), "damping"),
        (lambda: CG(damping=float("nan")), "damping"),
        (lambda: CG(max_iter=0), "max_iter"),
        (lambda: LiSSA(depth=0), "depth"),
        (lambda: LiSSA(depth=10.5), "depth"),
        (lambda: LiSSA(scale=0.0), "scale"),
        (lambda: Arnoldi(rank=20, iterations=10), "iterations"),
        (lambda: Identity(damping=0.1), "damping"),
        (lambda: Exact(max_params=0), "max_params"),
    ],
)
def test_invalid_settings_are_rejected_on_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_settings_are_frozen_and_json_ready():
    est = LiSSA(depth=7, damping=0.1)
    with pytest.raises(AttributeError):
        est.depth = 8  # type: ignore[misc]
    assert est.settings() == {
        "estimator": "lissa",
        "damping": 0.1,
        "depth": 7,
        "repeats": 1,
        "scale": None,
        "batch_size": 32,
        "seed": 0,
        "tol": 0.6,
        "on_unconverged": "raise",
    }


def test_exact_refuses_models_too_large_to_form_h(logistic_curvature):
    with pytest.raises(ConfigError, match="CG, LiSSA or Arnoldi"):
        Exact(max_params=100).fit(logistic_curvature)
