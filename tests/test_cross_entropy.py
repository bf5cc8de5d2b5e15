"""The built-in cross-entropy: the value of ``F.cross_entropy`` for every label form, written so
that batches of Hessian-vector products through it run as batched kernels (see
``test_batched_products.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influencer._kernel.losses import cross_entropy


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
