"""``ExactOrCG``: block CG for few right-hand sides, the dense matrix for many; the same system, so
the same answer to CG's tolerance whichever runs, and saved fits load back."""

from __future__ import annotations

import pytest
import torch

from influencer import CG, Exact, ExactOrCG, Influence
from influencer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(mlp_small, digits_small):
    """The undamped Gauss-Newton system of the small MLP (p = 910), solved densely."""
    model, task = mlp_small
    train = digits_small.train
    exact = Influence(model, task, train, estimator=Exact(), curvature="gauss_newton").fit()
    return model, task, train, exact


def _directions(p: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_few_columns_run_block_cg_and_match_the_dense_solve(reference):
    model, task, train, exact = reference
    inf = Influence(model, task, train, estimator=ExactOrCG(tol=1e-10), curvature="gauss_newton").fit()
    v = _directions(inf.p, 3)
    x = inf.solver.solve(v)
    assert inf.solver.info["method"] == "cg" and inf.solver.dense is None
    assert inf.solver.info["iterations"] * 3 < inf.p  # cheaper than p products
    torch.testing.assert_close(x, exact.solver.solve(v), rtol=1e-7, atol=1e-12)
    # The same columns through explicit block CG: the very same iterations.
    cg = Influence(model, task, train, estimator=CG(tol=1e-10), curvature="gauss_newton").fit()
    torch.testing.assert_close(x, cg.solver.solve(v), rtol=1e-12, atol=1e-14)


def test_many_columns_build_the_dense_matrix_once(reference):
    model, task, train, exact = reference
    inf = Influence(model, task, train, estimator=ExactOrCG(), curvature="gauss_newton").fit()
    solver = inf.solver
    small = _directions(inf.p, 4, seed=1)
    solver.solve(small)
    t = solver.cg_iterations
    assert solver.info["method"] == "cg" and t is not None
    # k columns with k x t >= p: straight to the dense matrix, kept for every later solve.
    k = -(-inf.p // t)
    v = _directions(inf.p, k, seed=2)
    x = solver.solve(v)
    assert solver.info["method"] == "exact" and "iterations x these columns" in solver.info["why_exact"]
    torch.testing.assert_close(x, exact.solver.solve(v), rtol=1e-12, atol=1e-14)
    dense = solver.dense
    solver.solve(small)
    assert solver.dense is dense and solver.info["method"] == "exact"


def test_cg_stopped_at_its_budget_falls_back_to_the_dense_solve(reference):
    model, task, train, exact = reference
    # 200 columns: CG may run ceil(910 / 200) = 5 iterations, far from tol 1e-12 on this system.
    inf = Influence(model, task, train, estimator=ExactOrCG(tol=1e-12), curvature="gauss_newton").fit()
    v = _directions(inf.p, 200, seed=3)
    x = inf.solver.solve(v)
    assert (
        inf.solver.info["method"] == "exact"
        and "had not converged after 5 iterations" in inf.solver.info["why_exact"]
    )
    torch.testing.assert_close(x, exact.solver.solve(v), rtol=1e-12, atol=1e-14)


def test_scores_with_damping_agree_whichever_method_ran(reference, digits_small):
    model, task, train, _ = reference
    damped = dict(estimator=ExactOrCG(damping=1e-2), curvature="gauss_newton")
    test_few = (digits_small.x_test[:2], digits_small.y_test[:2])
    few = Influence(model, task, train, **damped).fit()
    many = Influence(model, task, train, **damped, solve_batch=4096).fit()
    many.solver.solve(_directions(many.p, many.p, seed=4))  # as many columns as parameters: dense
    assert few.scores(test_few) is not None and few.solver.info["method"] == "cg"
    assert many.solver.info["method"] == "exact" and many.solver.info["damping"] == 1e-2
    ref = Influence(model, task, train, estimator=Exact(damping=1e-2), curvature="gauss_newton").fit()
    torch.testing.assert_close(few.scores(test_few), ref.scores(test_few), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(many.scores(test_few), ref.scores(test_few), rtol=1e-9, atol=1e-13)


def test_a_fit_with_its_dense_matrix_saves_and_loads(reference, digits_small, tmp_path):
    model, task, train, _ = reference
    test = (digits_small.x_test[:3], digits_small.y_test[:3])
    inf = Influence(model, task, train, estimator=ExactOrCG(), curvature="gauss_newton").fit()
    inf.solver.solve(_directions(inf.p, inf.p))
    scores = inf.scores(test)
    inf.save(tmp_path)
    loaded = Influence.load(tmp_path, model, task, train)
    assert loaded.solver.dense is not None and torch.equal(loaded.scores(test), scores)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match=r"ExactOrCG\.tol"):
        ExactOrCG(tol=0)
    with pytest.raises(ConfigError, match="damping"):
        ExactOrCG(damping=-1)
