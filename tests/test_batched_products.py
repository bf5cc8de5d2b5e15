"""Curvature products of many vectors: batched through the loss and the activations (the number of
operators does not grow with the vectors), a loop of backward passes for convolutional models (whose
second derivatives have no batched kernel); the same products either way."""

from __future__ import annotations

import pytest
import torch

from influencer import ClassificationTask
from influencer._kernel.functional import ModelFunction
from influencer.models import MLP, SmallCNN


def _op_calls(product, v: torch.Tensor) -> int:
    """How many aten operators one batched product of the rows of ``v`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        product(v)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_batched_curvature_products_run_no_loop_over_the_vectors(digits_small, kind):
    """``log_softmax``'s backward has no vmap batching rule: a batch of second derivatives through
    ``F.cross_entropy`` runs as a loop over the vectors (several operators per vector). Through the
    task's loss, the operators run once for the whole batch, however many vectors it holds."""
    torch.manual_seed(0)
    model, task = MLP(64, (8,), 10).double(), ClassificationTask(weight_decay=1e-3)
    fn = ModelFunction(model, task)
    batch = fn.prepare((digits_small.x_train[:16], digits_small.y_train[:16]))
    lin = fn.linearize(fn.theta0, batch, 1.0, kind)
    v = torch.randn(40, fn.p, dtype=torch.float64)
    lin(v[:4])  # warm-up
    assert _op_calls(lin, v[:40]) == _op_calls(lin, v[:4])
    one_by_one = torch.cat([lin(v[i : i + 1]) for i in range(len(v))])
    torch.testing.assert_close(lin(v), one_by_one, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_a_convolutional_model_loops_over_the_vectors_with_the_same_products(digits, kind):
    torch.manual_seed(0)
    model, task = SmallCNN(10, 4).double(), ClassificationTask(weight_decay=1e-3)
    fn = ModelFunction(model, task)
    assert fn.loops_over_vectors and not ModelFunction(MLP(64, (8,), 10), task).loops_over_vectors
    images = digits.x_train[:8].reshape(-1, 1, 8, 8)
    batch = fn.prepare((images, digits.y_train[:8]))
    lin = fn.linearize(fn.theta0, batch, 1.0, kind)
    v = torch.randn(6, fn.p, dtype=torch.float64)
    looped = lin(v)
    fn.loops_over_vectors = False
    batched = fn.linearize(fn.theta0, batch, 1.0, kind)(v)
    torch.testing.assert_close(looped, batched, rtol=1e-10, atol=1e-12)
    assert _op_calls(lin, v[:6]) > _op_calls(lin, v[:2])  # a loop: operators grow with the vectors


@pytest.mark.parametrize("regularized", [True, False])
def test_products_do_not_depend_on_how_many_vectors_a_pass_takes(digits_small, regularized):
    """The automatic width (as many vectors per backward pass as fit the working-set budget) and
    any fixed one give the same full and minibatch products, with the L2 term or a custom
    regulariser added in place."""
    from influencer._kernel import curvature as curvature_module
    from influencer._kernel.curvature import Curvature
    from influencer.data import as_examples

    class CustomPenalty(ClassificationTask):
        def regularizer(self, params):  # not the plain L2 form: its Hessian is taken by autograd
            return sum((q**4).sum() for q in params.values()) * 1e-3

    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-2) if regularized else CustomPenalty()
    fn = ModelFunction(MLP(64, (8,), 10).double(), task)
    data = as_examples((digits_small.x_train[:60], digits_small.y_train[:60]))
    theta = fn.theta0 + 0.1
    v = torch.randn(23, fn.p, dtype=torch.float64)
    results = {}
    for width in (None, 1, 5, 64):
        curv = Curvature(fn, theta, data, batch_size=16, vector_batch=width)
        full = curv.matvec(v)
        sampled = curv.sample_matvec(v, torch.Generator().manual_seed(3), 8)
        results[width] = (full, sampled)
    for full, sampled in results.values():
        torch.testing.assert_close(full, results[1][0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(sampled, results[1][1], rtol=1e-12, atol=1e-13)
    # the Hessian of the penalty itself, against a dense autograd Hessian
    dense = torch.autograd.functional.hessian(lambda t: fn.regularizer(t), theta)
    torch.testing.assert_close(
        Curvature(fn, theta, data)._add_regularizer(torch.zeros_like(v), v), v @ dense, rtol=1e-12, atol=1e-13
    )

    # The automatic width shrinks as a batch's graph grows, within the budget.
    curv = Curvature(fn, theta, data)
    small = fn.linearize(theta, fn.prepare(data.take(torch.arange(4))), 1.0, measure=True)
    large = fn.linearize(theta, fn.prepare(data.take(torch.arange(60))), 1.0, measure=True)
    assert curv._width(small) > curv._width(large) >= 1
    assert curv._width(large) * (large.nbytes + fn.p * 8) <= curvature_module._VECTOR_BYTES
    # On a GPU, wide passes (64, as many as memory allows below that) whatever the cache.
    width, cpu, gpu = curvature_module.pass_width, torch.device("cpu"), torch.device("cuda")
    assert width(10_000, cpu) > 64 and width(10_000, gpu) == 64
    assert width(2**20, cpu) == 32 and width(2**20, gpu) == 64
    assert width(2**28, gpu) == 4 and width(2**31, gpu) == width(2**31, cpu) == 1
