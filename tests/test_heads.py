"""Influence over a head on fixed features equals influence over the head of the whole network,
and the frozen part of the network runs once over the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain_support import _text_data, tiny_bert
from influencer import ClassificationTask, Exact, Influence, RegressionTask
from influencer.datasets import load_digits
from influencer.errors import TaskError
from influencer.heads import Head, original_batch
from influencer.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class Counter:
    """Counts the examples a module's forward has seen."""

    def __init__(self, module: nn.Module) -> None:
        self.examples = 0
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]  # BERT: last_hidden_state
        self.examples += len(out)


def head_and_full(model, task, name, train, test, estimator):
    """Scores of the head on its features and of the whole network over the head's parameters."""
    counter = Counter(model.bert if hasattr(model, "bert") else model.features)
    head = Head(model, task, name)
    train_f, test_f = (head.features(d, dtype=F64, batch_size=16) for d in (train, test))
    frozen_runs = counter.examples
    view = Influence(head.model, head.task, train_f, estimator=estimator, hessian_batch_size=4096).fit()
    scores = view.scores(test_f)
    after = counter.examples
    full = Influence(model, task, train, estimator=estimator, params=[name], dtype=F64).fit()
    assert view.fn.names == full.fn.names
    return scores, full.scores(test), frozen_runs, after


def test_cnn_head_on_features_equals_the_network_head():
    split = load_digits(images=True, dtype=F64)
    train, test = (split.x_train[:80], split.y_train[:80]), (split.x_test[:6], split.y_test[:6])
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, channels=2).double()
    task = ClassificationTask(weight_decay=1e-2)
    scores, expected, frozen, after = head_and_full(model, task, "head", train, test, Exact(damping=1e-3))
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
    assert frozen == 80 + 6 and after == frozen  # the convolutions ran once per example, then never


def test_transformer_classifier_on_features_equals_the_network_classifier():
    pytest.importorskip("transformers")
    from influencer.tasks import SequenceClassificationTask

    tok, train, test = _text_data(30, 5)
    model = tiny_bert(len(tok), num_labels=2).eval()
    task = SequenceClassificationTask(weight_decay=1e-3)
    scores, expected, frozen, after = head_and_full(
        model, task, "classifier", train, test, Exact(damping=1e-3)
    )
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
    assert frozen == 30 + 5 and after == frozen


def test_head_keeps_only_the_labels_of_builtin_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    head = Head(model, ClassificationTask(), "2")
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    batch = head.features((x, y)).take(torch.arange(5))
    assert batch["features"].shape == (5, 3) and batch["batch"][0].shape == (5, 0)
    assert torch.equal(original_batch(batch)[1], y)
    with torch.no_grad():
        torch.testing.assert_close(head.model(batch["features"]), model(x))


def test_heads_that_cannot_be_separated_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Softmax(dim=1))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    with pytest.raises(TaskError, match=r"no module named 'clasifier'"):
        Head(model, ClassificationTask(), "clasifier")
    with pytest.raises(TaskError, match="something runs after it"):
        Head(model, ClassificationTask(), "2").extract((x, y))
    with pytest.raises(TaskError, match="no parameters"):
        Head(model, ClassificationTask(), "1")

    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(TaskError, match="tied"):
        Head(tied, RegressionTask(), "1")

    class Margin(ClassificationTask):
        def measurement(self, model, batch):
            return model(batch[0]).max(1).values

    with pytest.raises(TaskError, match="default measurement"):
        Head(model, Margin(), "2")
