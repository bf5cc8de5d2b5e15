"""Progress that speaks: iterative solves show their iteration, residual and time left; fits and
gradient passes show bars; ``progress=False`` and the default on a non-terminal are silent."""

from __future__ import annotations

import re

import pytest

from influencer import CG, EKFAC, Arnoldi, BlockCG, Influence, LiSSA
from influencer._kernel import progress
from influencer._kernel.progress import SolveProgress

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def logistic(logistic_small, digits_small):
    model, task = logistic_small
    return model, task, digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])


@pytest.mark.parametrize("estimator", [CG(), BlockCG()], ids=["cg", "block"])
def test_cg_shows_its_iterations_and_residual(logistic, capsys, estimator):
    model, task, train, test = logistic
    inf = Influence(model, task, train, estimator=estimator, progress=True).fit()
    inf.scores(test)
    err = capsys.readouterr().err
    name = type(estimator).__name__
    iterations = inf.solver.info["iterations"]
    # the last state stays printed: the iteration count the solver reports, and its residual
    last = re.findall(rf"{name}: iteration (\d+)/200, residual ([0-9.e+-]+) \(tol 1e-08\)", err)
    assert last and int(last[-1][0]) == iterations
    # the worst residual of the columns still iterating: above tol until the last iteration
    assert float(last[-1][1]) <= 1e-8 and all(float(r) > 1e-8 for _, r in last[:-1])
    assert "training gradients" in err  # the gradient pass has its bar too


def test_progress_false_and_the_default_off_a_terminal_are_silent(logistic, capsys):
    model, task, train, test = logistic
    Influence(model, task, train, estimator=CG(), progress=False).fit().scores(test)
    assert capsys.readouterr().err == ""
    Influence(model, task, train, estimator=CG()).fit().scores(test)  # stderr is captured: no terminal
    assert capsys.readouterr().err == ""


def test_the_default_on_a_terminal_shows_only_steps_slower_than_the_delay(logistic, capsys, monkeypatch):
    model, task, train, test = logistic
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    assert progress._options(None) == {"delay": progress.AUTO_DELAY}
    Influence(model, task, train, estimator=CG()).fit().scores(test)  # every step well under 2 s
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    Influence(model, task, train, estimator=CG()).fit().scores(test)
    assert "CG: iteration" in capsys.readouterr().err


def test_the_time_left_is_extrapolated_from_the_residual(capsys):
    bar = SolveProgress("CG", True, tol=1e-8, max_iter=1000)
    bar.update(1, 1e-1)
    bar.update(2, 1e-2)
    bar.close()
    err = capsys.readouterr().err
    assert re.search(r"iteration 2/1000, residual 1\.00e-02 \(tol 1e-08\), about \d+ s left", err)
    silent = SolveProgress("CG", False, tol=1e-8, max_iter=10)
    silent.update(1, 0.5)
    silent.close()
    assert not silent.enabled and capsys.readouterr().err == ""


@pytest.mark.filterwarnings("ignore:Arnoldi with rank 5 does not capture")
def test_lissa_arnoldi_and_ekfac_fits_show_their_steps(mlp_small, digits_small, capsys):
    model, task = mlp_small
    train, test = digits_small.train, (digits_small.x_test[:2], digits_small.y_test[:2])
    common = {"curvature": "gauss_newton", "progress": True}
    Influence(model, task, train, estimator=LiSSA(damping=0.1, depth=50, tol=10.0), **common).fit().scores(
        test
    )
    Influence(model, task, train, estimator=Arnoldi(damping=0.1, rank=5, iterations=10), **common).fit()
    Influence(model, task, train, estimator=EKFAC(damping=0.1), **common).fit()
    err = capsys.readouterr().err
    for step in ("largest eigenvalue", "LiSSA (2 vectors)", "Arnoldi", "K-FAC factors", "EK-FAC eigenvalues"):
        assert step in err
