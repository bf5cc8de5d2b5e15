"""The built-in cross-entropy: the value of ``F.cross_entropy`` for every label form, written so
that batches of Hessian-vector products through it run as batched kernels (no vmap fallback)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influencer import ClassificationTask
from influencer._kernel.functional import ModelFunction
from influencer._kernel.losses import cross_entropy
from influencer.models import MLP


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30


def test_equals_torch_for_class_indices_ignored_labels_and_probabilities(logits):
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    torch.testing.assert_close(cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"))
    ignored = torch.tensor([0, -100, 2, -100, 1, 3, 0])
    torch.testing.assert_close(
        cross_entropy(logits, ignored, -100), F.cross_entropy(logits, ignored, reduction="none")
    )
    assert (cross_entropy(logits, ignored, -100)[ignored == -100] == 0).all()
    probs = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1) * 2  # a total of 2: scaled
    torch.testing.assert_close(cross_entropy(logits, probs), F.cross_entropy(logits, probs, reduction="none"))
    # Gradients too (large logits: the logsumexp form must stay stable).
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(cross_entropy(a, y).sum(), a)
    (gb,) = torch.autograd.grad(F.cross_entropy(b, y, reduction="sum"), b)
    torch.testing.assert_close(ga, gb)


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
