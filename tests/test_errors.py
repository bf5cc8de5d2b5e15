"""Bad input gets a clear error that names the fix, never a silent NaN or a wrong answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influencer import CG, ClassificationTask, Exact, Influence, Task
from influencer.errors import (
    ConfigError,
    ConvergenceError,
    DataError,
    IndefiniteHessianError,
    NonFiniteError,
    TaskError,
)


class ReducedLoss(Task):
    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])  # mean over the batch: wrong


class WrongShapeLoss(Task):
    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")[:, None].repeat(1, 2)


@pytest.fixture()
def small(digits_small):
    torch.manual_seed(0)
    return nn.Linear(64, 10).double(), (digits_small.x_train[:50], digits_small.y_train[:50])


def test_reduced_loss_is_refused(small):
    model, train = small
    with pytest.raises(TaskError, match=r"reduction='none'"):
        Influence(model, ReducedLoss(), train).fit()


def test_loss_with_extra_dimensions_is_refused(small):
    model, train = small
    with pytest.raises(TaskError, match=r"one value per example, shape \(2,\).*got shape \(2, 2\)"):
        Influence(model, WrongShapeLoss(), train).fit()


def test_test_data_of_another_shape_is_refused(small):
    model, train = small
    inf = Influence(model, ClassificationTask(), train, estimator=Exact(damping=0.1)).fit()
    with pytest.raises(DataError, match=r"\(64,\).*\(32,\)"):
        inf.scores((torch.randn(3, 32, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)))


def test_test_data_of_another_dtype_is_refused(small):
    model, train = small
    inf = Influence(model, ClassificationTask(), train, estimator=Exact(damping=0.1)).fit()
    with pytest.raises(DataError, match="preprocessed the same way"):
        inf.scores((train[0][:2], train[1][:2].double()))  # float labels where ints were trained on


def test_non_finite_inputs_are_reported_with_their_ids(small):
    model, (x, y) = small
    x = x.clone()
    x[37, 5] = float("nan")
    inf = Influence(model, ClassificationTask(weight_decay=0.1), (x, y), estimator=CG())
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[37\]"):
        list(inf.train_gradients())


def test_nan_in_the_first_batch_is_caught_before_any_work(small):
    model, (x, y) = small
    x = x.clone()
    x[0, 0] = float("inf")
    with pytest.raises(TaskError, match="not finite"):
        Influence(model, ClassificationTask(), (x, y)).fit()


def test_indefinite_hessian_with_zero_damping_names_the_fix(digits_small):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()  # untrained: not a minimum
    train = (digits_small.x_train[:80], digits_small.y_train[:80])
    with pytest.raises(IndefiniteHessianError, match=r"damping > .*gauss_newton"):
        Influence(model, ClassificationTask(), train, estimator=Exact()).fit()


def test_singular_hessian_is_refused_and_damping_fixes_it(small):
    model, train = small
    # Softmax logits are invariant to a shared shift, so the unregularised Hessian is singular.
    with pytest.raises(IndefiniteHessianError, match="singular"):
        Influence(model, ClassificationTask(), train, estimator=Exact()).fit()
    Influence(model, ClassificationTask(), train, estimator=Exact(damping=1e-3)).fit()


def _float32_logistic(digits_small, weight_decay):
    from influencer.models import LogisticRegression
    from influencer.training import train_lbfgs, train_minibatch

    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=weight_decay)
    train = (digits_small.x_train, digits_small.y_train)
    model = LogisticRegression(64, 10).double()
    if weight_decay > 0:
        train_lbfgs(model, task, train)
    else:  # no optimum to reach (the data are separable): a trained model is enough
        train_minibatch(model, task, train, epochs=5, lr=0.05, batch_size=50)
    return model.float(), task, (train[0].float(), train[1])


def test_float32_exact_accepts_a_positive_definite_hessian(digits_small):
    """Condition number 1.3e3 (weight decay 1e-4): well within float32's reach, and the answer
    agrees with the float64 solve to float32 accuracy."""
    model, task, train = _float32_logistic(digits_small, 1e-4)
    inf = Influence(model, task, train, estimator=Exact(float64=False)).fit()
    assert 1e3 < inf.solver.info["condition_number"] < 2e3
    ref = Influence(model, task, train, estimator=Exact(), dtype=torch.float64).fit()
    test = (digits_small.x_test[:3].float(), digits_small.y_test[:3])
    v = ref.gradients((test[0].double(), test[1]))
    x32, x64 = inf.inverse_hvp(v.float()).double(), ref.inverse_hvp(v)
    assert float((x32 - x64).norm() / x64.norm()) < 1e-3


def test_float32_exact_suggests_a_damping_that_works(digits_small):
    """Without weight decay the Hessian is singular (a shared shift of the logits, pixels that are
    always 0); the damping the message suggests must then be accepted."""
    import re

    model, task, train = _float32_logistic(digits_small, 0.0)
    with pytest.raises(
        IndefiniteHessianError, match=r"singular.* at float32 precision; pass damping > "
    ) as info:
        Influence(model, task, train, estimator=Exact(float64=False)).fit()
    suggested = float(re.search(r"e\.g\. damping=([0-9.e+-]+)\)", str(info.value)).group(1))
    inf = Influence(model, task, train, estimator=Exact(float64=False, damping=suggested)).fit()
    assert inf.solver.info["min_eigenvalue"] > 0


@pytest.mark.parametrize(
    "data",
    [(torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64)), (), []],
)
def test_empty_data_is_refused(data):
    with pytest.raises(DataError, match="empty"):
        Influence(nn.Linear(64, 10), ClassificationTask(), data)


def test_ragged_data_is_refused():
    with pytest.raises(DataError, match=r"same number of examples; got lengths \[4, 5\]"):
        Influence(
            nn.Linear(3, 2), ClassificationTask(), (torch.zeros(5, 3), torch.zeros(4, dtype=torch.int64))
        )


def test_unknown_data_type_is_refused():
    with pytest.raises(DataError, match="cannot use"):
        Influence(nn.Linear(3, 2), ClassificationTask(), "train.csv")


def test_scores_before_fit_are_refused(small):
    model, train = small
    inf = Influence(model, ClassificationTask(), train)
    with pytest.raises(ConfigError, match=r"fit\(\)"):
        inf.scores(train)


def test_bad_settings_are_refused(small):
    model, train = small
    with pytest.raises(ConfigError, match="curvature"):
        Influence(model, ClassificationTask(), train, curvature="fisher").fit()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        Influence(model, ClassificationTask(), train, batch_size=0)
    with pytest.raises(ConfigError, match="Task"):
        Influence(model, nn.CrossEntropyLoss(), train)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"indices must lie in \[0, 50\)"):
        Influence(model, ClassificationTask(), train, hessian_indices=[0, 50]).fit()


def test_a_task_without_outputs_cannot_use_gauss_newton(small):
    model, train = small

    class LossOnly(Task):
        def loss(self, model, batch):
            return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(TaskError, match="output_loss"):
        Influence(model, LossOnly(), train, estimator=CG(damping=0.1), curvature="gauss_newton").fit().scores(
            (train[0][:1], train[1][:1])
        )


# Arnoldi's spectrum warning at rank = rank(H) counts the null directions as dropped ones.
@pytest.mark.filterwarnings("ignore:Arnoldi with rank")
def test_singular_curvature_without_damping_gives_the_pseudo_inverse_answer_with_cg_and_arnoldi():
    """As the README says: Exact refuses singular curvature; CG and BlockCG return H^+ v for
    gradients (which lie in H's range: the null space is a shared shift of the logits and the
    weights of two always-zero features); Arnoldi the same within the eigenpairs it keeps, and it
    refuses once its rank reaches the null space."""
    import robust_jobs
    from influencer import Arnoldi, BlockCG

    task, model, train, test = robust_jobs.singular()
    inf = Influence(model, task, train, estimator=CG(damping=0.0)).fit()
    h = inf.curvature.dense()
    eigenvalues = torch.linalg.eigvalsh(h)
    rank = int((eigenvalues > 1e-10 * eigenvalues[-1]).sum())
    assert rank < inf.p  # singular
    v = inf.gradients(test)
    pinv = v @ torch.linalg.pinv(h, hermitian=True)
    with pytest.raises(IndefiniteHessianError, match="singular"):
        inf.replace(estimator=Exact()).fit()
    for estimator in (CG(damping=0.0), BlockCG(damping=0.0), Arnoldi(damping=0.0, rank=rank)):
        x = inf.replace(estimator=estimator).fit().inverse_hvp(v)
        assert float((x - pinv).norm() / pinv.norm()) < 1e-6, type(estimator).__name__
    with pytest.raises(IndefiniteHessianError, match=r"eigenvalue .* <= -damping \(0\)"):
        inf.replace(estimator=Arnoldi(damping=0.0, rank=rank + 4)).fit().inverse_hvp(v)
    # a right-hand side with a part in the null space has no solution: CG refuses it
    null = torch.linalg.eigh(h).eigenvectors[:, 0]
    with pytest.raises((ConvergenceError, IndefiniteHessianError), match=r"CG (did not converge|met)"):
        inf.replace(estimator=CG(damping=0.0)).fit().inverse_hvp(v[:1] + null * v[:1].norm())
