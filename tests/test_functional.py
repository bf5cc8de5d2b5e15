"""Per-example gradients, HVPs and Gauss-Newton products against plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influencer import ClassificationTask, RegressionTask, Task
from influencer._kernel.functional import ModelFunction, select_parameters
from influencer.errors import TaskError
from influencer.models import MLP


def plain_grad(model: nn.Module, value: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])


def test_per_example_gradients_equal_a_loop(digits_small, mlp_small):
    model, task = mlp_small
    fn = ModelFunction(model, task)
    x, y = digits_small.x_train[:17], digits_small.y_train[:17]
    vmapped = fn.loss_grads(fn.theta0, (x, y))  # (17, p)
    params = dict(model.named_parameters())
    looped = torch.stack(
        [
            plain_grad(model, task.loss(model, (x[i : i + 1], y[i : i + 1])).sum() + task.regularizer(params))
            for i in range(17)
        ]
    )
    assert vmapped.shape == (17, fn.p)
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-12)


def test_measurement_gradients_exclude_the_regulariser(digits_small, mlp_small):
    model, task = mlp_small
    fn = ModelFunction(model, task)
    x, y = digits_small.x_test[:5], digits_small.y_test[:5]
    looped = torch.stack(
        [plain_grad(model, task.loss(model, (x[i : i + 1], y[i : i + 1])).sum()) for i in range(5)]
    )
    torch.testing.assert_close(fn.measurement_grads(fn.theta0, (x, y)), looped, rtol=1e-10, atol=1e-12)


def dense_hessian(model: nn.Module, objective) -> torch.Tensor:
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(objective(), params, create_graph=True)])
    rows = [
        torch.cat([r.reshape(-1) for r in torch.autograd.grad(g[k], params, retain_graph=True)])
        for k in range(g.numel())
    ]
    return torch.stack(rows)


def test_hvp_matches_dense_double_backward_hessian(digits_small):
    torch.manual_seed(1)
    model = MLP(64, (5,), 3).double()
    task = ClassificationTask(weight_decay=0.1)
    x, y = digits_small.x_train[:40], digits_small.y_train[:40] % 3
    fn = ModelFunction(model, task)
    params = dict(model.named_parameters())
    h = dense_hessian(model, lambda: task.loss(model, (x, y)).mean() + task.regularizer(params))
    v = torch.randn(4, fn.p, dtype=torch.float64)
    product = fn.hvp(fn.theta0, (x, y), v, 1.0 / 40) + fn.regularizer_hvp(fn.theta0, v)
    torch.testing.assert_close(product, v @ h, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fn.regularizer_hvp(fn.theta0, v), 0.1 * v)
    out = torch.ones_like(v)
    assert fn.regularizer_hvp(fn.theta0, v, out=out) is out  # added in place
    torch.testing.assert_close(out, 1 + 0.1 * v, rtol=1e-15, atol=1e-15)


def test_gauss_newton_product_matches_explicit_jacobians(digits_small):
    torch.manual_seed(2)
    model = MLP(64, (4,), 3).double()
    task = ClassificationTask(weight_decay=0.05)
    x, y = digits_small.x_train[:6], digits_small.y_train[:6] % 3
    fn = ModelFunction(model, task)
    theta = fn.theta0
    jac = torch.autograd.functional.jacobian(lambda t: fn.outputs(t, (x, y)), theta)  # (6, 3, p)
    ggn = torch.zeros(fn.p, fn.p, dtype=torch.float64)
    for i in range(6):
        prob = torch.softmax(fn.outputs(theta, (x, y))[i], 0).detach()
        h_out = torch.diag(prob) - torch.outer(prob, prob)  # cross-entropy Hessian in the logits
        ggn += jac[i].T @ h_out @ jac[i] / 6
    ggn += 0.05 * torch.eye(fn.p, dtype=torch.float64)  # Hessian of the L2 penalty
    v = torch.randn(3, fn.p, dtype=torch.float64)
    product = fn.ggn_vp(theta, (x, y), v, 1.0 / 6) + fn.regularizer_hvp(theta, v)
    torch.testing.assert_close(product, v @ ggn, rtol=1e-9, atol=1e-11)


def test_gauss_newton_equals_hessian_for_linear_least_squares(digits_small):
    model = nn.Linear(64, 2).double()
    task = RegressionTask(weight_decay=0.01)
    x = digits_small.x_train[:30]
    y = torch.randn(30, 2, dtype=torch.float64)
    fn = ModelFunction(model, task)
    v = torch.randn(5, fn.p, dtype=torch.float64)
    torch.testing.assert_close(
        fn.ggn_vp(fn.theta0, (x, y), v, 1 / 30), fn.hvp(fn.theta0, (x, y), v, 1 / 30), rtol=1e-10, atol=1e-12
    )


def test_parameter_selection_by_prefix_and_name():
    model = MLP(4, (3,), 2)
    assert select_parameters(model, None) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert select_parameters(model, ["2"]) == ["2.weight", "2.bias"]
    assert select_parameters(model, "0.weight") == ["0.weight"]
    with pytest.raises(TaskError, match="no parameter or module named 'head'"):
        select_parameters(model, ["head"])


def test_subset_of_parameters_keeps_the_rest_fixed(digits_small):
    torch.manual_seed(3)
    model = MLP(64, (6,), 10).double()
    fn = ModelFunction(model, ClassificationTask(), params=["2"])
    assert fn.p == 6 * 10 + 10
    x, y = digits_small.x_train[:8], digits_small.y_train[:8]
    full = ModelFunction(model, ClassificationTask())
    g_full = full.loss_grads(full.theta0, (x, y))
    torch.testing.assert_close(fn.loss_grads(fn.theta0, (x, y)), g_full[:, -fn.p :])


def test_the_module_is_never_modified(digits_small):
    model = MLP(64, (6,), 10).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = ModelFunction(model, ClassificationTask(weight_decay=0.1))
    fn.loss_grads(fn.theta0 + 1.0, (digits_small.x_train[:4], digits_small.y_train[:4]))
    fn.hvp(fn.theta0 + 1.0, (digits_small.x_train[:4], digits_small.y_train[:4]), fn.theta0[None], 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_cast_to_float64_computes_in_double():
    model = MLP(4, (3,), 2)  # float32
    fn = ModelFunction(model, ClassificationTask()).cast(torch.float64)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    g = fn.loss_grads(fn.theta0, fn.prepare((x, y)))
    assert g.dtype == torch.float64 and g.shape == (5, fn.p)


def test_custom_task_with_dict_batches():
    class DictTask(Task):
        def loss(self, model, batch):
            return (model(batch["x"]).squeeze(-1) - batch["target"]) ** 2

    model = nn.Linear(3, 1).double()
    fn = ModelFunction(model, DictTask())
    batch = {"x": torch.randn(4, 3, dtype=torch.float64), "target": torch.randn(4, dtype=torch.float64)}
    g = fn.loss_grads(fn.theta0, batch)
    r = (batch["x"] @ model.weight[0] + model.bias - batch["target"]).detach()
    torch.testing.assert_close(g, torch.cat([2 * r[:, None] * batch["x"], 2 * r[:, None]], dim=1))
    with pytest.raises(TaskError, match="output_loss"):
        fn.ggn_vp(fn.theta0, batch, fn.theta0[None], 1.0)


def test_regulariser_curvature_shortcut_matches_autodiff():
    class CustomPenalty(ClassificationTask):
        def regularizer(self, params):
            return sum((p**4).sum() for p in params.values())

    model = MLP(4, (3,), 2).double()
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    l2 = ModelFunction(model, ClassificationTask(weight_decay=0.3))
    assert ClassificationTask(weight_decay=0.3).regularizer_curvature() == 0.3
    assert Task().regularizer_curvature() == 0.0
    assert CustomPenalty().regularizer_curvature() is None  # overriding the penalty disables it
    torch.testing.assert_close(l2.regularizer_hvp(l2.theta0, v), 0.3 * v)
    quartic = ModelFunction(model, CustomPenalty())
    expected = v * 12 * quartic.theta0**2  # Hessian of sum t^4 is diag(12 t^2)
    torch.testing.assert_close(quartic.regularizer_hvp(quartic.theta0, v), expected)


def test_regulariser_gradient_shortcut_is_autodiff_bit_for_bit():
    """The built-in L2 penalty's gradient is written out (``weight_decay * theta``): the same bits as
    autograd's; an overridden penalty goes through autograd."""

    class CustomPenalty(ClassificationTask):
        def regularizer(self, params):
            return sum((p**4).sum() for p in params.values())

    torch.manual_seed(0)
    model = MLP(4, (3,), 2).double()
    for wd in (0.3, 1e-3, 7.1e-5, 0.0):
        fn = ModelFunction(model, ClassificationTask(weight_decay=wd))
        assert torch.equal(fn.regularizer_grad(fn.theta0), torch.func.grad(fn.regularizer)(fn.theta0))
    head = ModelFunction(model, ClassificationTask(weight_decay=0.3), params=["2.weight", "2.bias"])
    assert torch.equal(head.regularizer_grad(head.theta0), torch.func.grad(head.regularizer)(head.theta0))
    quartic = ModelFunction(model, CustomPenalty())
    torch.testing.assert_close(quartic.regularizer_grad(quartic.theta0), 4 * quartic.theta0**3)
