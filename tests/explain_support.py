"""Small real jobs for the `influencer explain` tests: digit images and a linear model, trained once."""

from __future__ import annotations

import functools
import textwrap

import torch
from torch import nn

from influencer import ClassificationTask
from influencer.app.job.job import Job
from influencer.datasets import load_digits
from influencer.training import train_minibatch

# A user's job module, as `--task tiny_job:build` would import it.
TASK_MODULE = textwrap.dedent(
    """
    import torch
    from influencer import ClassificationTask
    from influencer.datasets import load_digits
    from influencer.training import train_minibatch


    def build():
        split = load_digits(images=True, dtype=torch.float64)
        train = (split.x_train[:90], split.y_train[:90])
        test = (split.x_test[:20], split.y_test[:20])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
        task = ClassificationTask(weight_decay=1e-2)
        train_minibatch(model, task, train, epochs=4, lr=0.05, batch_size=30)
        return task, model, train, test


    def build_dict():
        task, model, train, test = build()
        return {"task": task, "model": model, "train": train, "test": test, "name": "dict job"}


    def build_wrong():
        return 42
    """
)


@functools.cache
def _data(n_train: int, n_test: int):
    split = load_digits(images=True, dtype=torch.float64)
    return (split.x_train[:n_train], split.y_train[:n_train]), (split.x_test[:n_test], split.y_test[:n_test])


@functools.cache
def _trained_state(n_train: int) -> dict[str, torch.Tensor]:
    model = _linear()
    train, _ = _data(n_train, 1)
    train_minibatch(model, ClassificationTask(weight_decay=1e-2), train, epochs=6, lr=0.05, batch_size=30)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()


def tiny_job(n_train: int = 120, n_test: int = 40, **fields) -> Job:
    """Softmax regression on 8x8 digit images (p = 650), a fresh copy of one trained model."""
    model = _linear()
    model.load_state_dict(_trained_state(n_train))
    train, test = _data(n_train, n_test)
    fields.setdefault("classes", [str(c) for c in range(10)])
    return Job(ClassificationTask(weight_decay=1e-2), model, train, test, name="tiny digits", **fields)


# ---- a tiny text classifier: a BERT built from a config, with a word-level tokenizer ------------


class WordTokenizer:
    """A word-level tokenizer with the parts of the Hugging Face tokenizer interface the report
    uses: ``__call__`` (padded tensors), ``decode``, ``convert_ids_to_tokens``, ``pad_token_id``."""

    special = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate([*self.special, *sorted(set(words))])}
        self.words = {i: w for w, i in self.vocab.items()}
        self.pad_token_id = 0
        self.all_special_ids = [self.vocab[w] for w in self.special]

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [[1, *(self.vocab.get(w, 3) for w in t.split()), 2] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    def convert_ids_to_tokens(self, ids):
        return [self.words.get(int(i), "[UNK]") for i in ids]

    def decode(self, ids, skip_special_tokens=False):
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return " ".join(self.words.get(int(i), "[UNK]") for i in ids if int(i) not in skip)


SUBJECTS = ["movie", "food", "service", "hotel", "book", "concert"]
POSITIVE = ["good", "great", "wonderful", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring"]


def review_sentences(n: int, seed: int):
    """Templated reviews ``the <subject> was [not] <adjective>`` and their sentiment labels."""
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.3
        words = ["the", rng.choice(SUBJECTS), "was", *(["not"] if negated else [])]
        words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(int(positive != negated))
    return texts, torch.tensor(labels)


def tiny_bert(vocab_size: int, num_labels: int = 2, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
            num_labels=num_labels,
            pad_token_id=0,
        )
        return BertForSequenceClassification(config).double()


@functools.cache
def _text_state(n_train: int):
    from influencer.tasks import SequenceClassificationTask

    tok, train, _ = _text_data(n_train, 1)
    model = tiny_bert(len(tok))
    with torch.random.fork_rng():
        train_minibatch(model, SequenceClassificationTask(), train, epochs=16, lr=5e-3, batch_size=16, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _text_data(n_train: int, n_test: int):
    texts, labels = review_sentences(n_train + n_test, seed=0)
    tok = WordTokenizer([*" ".join(texts).split(), "not"])
    enc = tok(texts)
    data = {**enc, "labels": labels}
    train = {k: v[:n_train] for k, v in data.items()}
    test = {k: v[n_train:] for k, v in data.items()}
    return tok, train, test


def text_job(n_train: int = 48, n_test: int = 12, **fields) -> Job:
    """A tiny BERT (built from a config) trained on templated review sentences."""
    from influencer.tasks import SequenceClassificationTask

    tok, train, test = _text_data(n_train, n_test)
    model = tiny_bert(len(tok))
    model.load_state_dict(_text_state(n_train))
    fields.setdefault("classes", ["negative", "positive"])
    return Job(SequenceClassificationTask(), model, train, test, name="tiny reviews", tokenizer=tok, **fields)


def tabular_job(**fields) -> Job:
    """Logistic regression on scikit-learn's wine data (13 named features, standardised)."""
    from influencer.datasets import load_tabular

    data = load_tabular("wine", dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(data.x_train.shape[1], 3).double()
    task = ClassificationTask(weight_decay=1e-2)
    train_minibatch(model, task, data.train, epochs=30, lr=0.05, batch_size=32, seed=0)
    fields.setdefault("feature_names", data.feature_names)
    fields.setdefault("classes", list(data.classes))
    return Job(task, model, data.train, data.test, name="wine", **fields)
