"""Hugging Face models, adapters, parameter choice and the user's module state.

Oracles: per-example gradients of each sequence run alone and unpadded through the model's own
forward (plain autograd, no vmap, no mask of ours); a dense float64 Hessian of those unpadded
losses; the same layer written as ``nn.Linear`` and as transformers' ``Conv1D``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from influencer import CG, EKFAC, KFAC, ClassificationTask, Exact, Influence
from influencer._kernel.functional import ModelFunction
from influencer.errors import TaskError
from influencer.tasks import (
    CausalLMTask,
    SequenceClassificationTask,
    adapter_parameters,
    per_token_examples,
    predictions,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
LENGTHS = [7, 3, 5, 2, 6, 4]  # right-padded to T = 7


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(bos|eos|pad)_token_id.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def transformers():
    return pytest.importorskip("transformers")


def padded(vocab: int, n_labels: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = max(LENGTHS)
    ids = torch.randint(1, vocab, (len(LENGTHS), t), generator=gen)
    mask = (torch.arange(t) < torch.tensor(LENGTHS)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if n_labels is not None:
        batch["labels"] = torch.randint(0, n_labels, (len(LENGTHS),), generator=gen)
    return batch


def bert(num_labels: int = 3) -> nn.Module:
    tf = transformers()
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    return tf.BertForSequenceClassification(config).double()


def gpt2() -> nn.Module:
    tf = transformers()
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return tf.GPT2LMHeadModel(config).double()


def flat_grad(model: nn.Module, names: list[str], value: torch.Tensor) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, [named[n] for n in names])])


def classification_loss(model, batch, i):
    """Example i alone, unpadded, through the model's own forward (it builds its own mask)."""
    n = LENGTHS[i]
    logits = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits
    return F.cross_entropy(logits, batch["labels"][i : i + 1])


def lm_loss(model, batch, i, reduction):
    n = LENGTHS[i]
    logits = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0, :-1]
    targets = batch["labels"][i, 1:n]
    keep = targets != -100
    losses = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    return losses.sum() if reduction == "sum" else losses.mean()


def lm_batch() -> dict[str, torch.Tensor]:
    batch = padded(20)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, :3] = -100  # an unscored prompt
    labels[4, :2] = -100
    return {**batch, "labels": labels}


# ---- per-example gradients on padded batches ------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_classification_gradients_match_unpadded_examples(vectorize):
    model, batch = bert().eval(), padded(30, 3)
    fn = ModelFunction(model, SequenceClassificationTask(vectorize=vectorize))
    g = fn.loss_grads(fn.theta0, batch)  # (B, p) on the padded batch
    ref = torch.stack([flat_grad(model, fn.names, classification_loss(model, batch, i)) for i in range(6)])
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_causal_lm_gradients_match_unpadded_examples(reduction, vectorize):
    model, batch = gpt2().eval(), lm_batch()
    fn = ModelFunction(model, CausalLMTask(reduction=reduction, vectorize=vectorize))
    ref = torch.stack([flat_grad(model, fn.names, lm_loss(model, batch, i, reduction)) for i in range(6)])
    torch.testing.assert_close(fn.loss_grads(fn.theta0, batch), ref, rtol=1e-9, atol=1e-12)
    losses = torch.stack([lm_loss(model, batch, i, reduction).detach() for i in range(6)])
    torch.testing.assert_close(fn.loss(fn.theta0, batch), losses)


def test_left_padding_with_position_ids_matches_unpadded_examples():
    model, right = gpt2().eval(), lm_batch()
    t, lengths = right["input_ids"].shape[1], torch.tensor(LENGTHS)
    shift = (torch.arange(t) - (t - lengths)[:, None]) % t  # row i rolled right by t - length
    left = {k: v.gather(1, shift) for k, v in right.items()}
    left["position_ids"] = (left["attention_mask"].cumsum(1) - 1).clamp_min(0)
    fn = ModelFunction(model, CausalLMTask())
    ref = torch.stack([flat_grad(model, fn.names, lm_loss(model, right, i, "sum")) for i in range(6)])
    torch.testing.assert_close(fn.loss_grads(fn.theta0, left), ref, rtol=1e-9, atol=1e-12)


def test_causal_lm_without_labels_scores_every_token():
    model, batch = gpt2().eval(), padded(20)
    fn = ModelFunction(model, CausalLMTask())
    with_labels = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    torch.testing.assert_close(fn.loss(fn.theta0, batch), fn.loss(fn.theta0, with_labels))


def test_per_token_examples_split_a_sequence_into_its_token_losses():
    model, batch = gpt2().eval(), lm_batch()
    fn = ModelFunction(model, CausalLMTask())
    tokens = per_token_examples(batch, index=0)
    assert tokens["input_ids"].shape == (4, 7)  # positions 3..6 are scored (0-2: prompt)
    per_token = fn.measurement(fn.theta0, tokens)
    torch.testing.assert_close(per_token.sum(), fn.measurement(fn.theta0, batch)[0])
    one = per_token_examples(batch, index=0, positions=[5])
    torch.testing.assert_close(fn.measurement(fn.theta0, one), per_token[2:3])
    with pytest.raises(TaskError, match="not scored"):
        per_token_examples(batch, index=3, positions=[4])  # sequence 3 has 2 tokens


class Branching(nn.Module):
    """A model whose forward branches on the mask's values, as transformers' mask code does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if not attention_mask.all():  # data-dependent Python control flow
            h = h * attention_mask[..., None]
        return self.head(h.sum(1))


def test_a_model_that_cannot_run_under_vmap_names_the_fallback():
    torch.manual_seed(0)
    model, batch = Branching().double(), padded(30, 3)
    fn = ModelFunction(model, SequenceClassificationTask(expand_mask=False))
    with pytest.raises(TaskError, match=r"vectorize=False"):
        fn.loss_grads(fn.theta0, batch)
    loop = ModelFunction(model, SequenceClassificationTask(vectorize=False))
    ref = []
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = F.cross_entropy(model(one["input_ids"], one["attention_mask"]), one["labels"])
        ref.append(flat_grad(model, loop.names, loss))
    torch.testing.assert_close(loop.loss_grads(loop.theta0, batch), torch.stack(ref))


# ---- scores against a dense float64 reference ---------------------------------------------------


def dense_scores(model, names, losses, test_losses, damping):
    """``(1/n) grad f_test^T (H + damping I)^-1 grad l_i`` from a dense Hessian of unpadded losses."""
    named = dict(model.named_parameters())
    theta = [named[n] for n in names]
    objective = torch.stack(losses()).mean()
    g = torch.autograd.grad(objective, theta, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in g])
    rows = [torch.autograd.grad(g[k], theta, retain_graph=True) for k in range(len(g))]
    h = torch.stack([torch.cat([x.reshape(-1) for x in r]) for r in rows])
    h = 0.5 * (h + h.T) + damping * torch.eye(len(g), dtype=F64)
    train_g = torch.stack([flat_grad(model, names, value) for value in losses()])
    test_g = torch.stack([flat_grad(model, names, value) for value in test_losses()])
    return test_g @ torch.linalg.solve(h, train_g.T) / train_g.shape[0]


def test_classification_scores_match_a_dense_reference():
    model, batch = bert().eval(), padded(30, 3)
    names = ["classifier", "bert.encoder.layer.0.attention.self.value"]  # one inside attention
    test = padded(30, 3, seed=1)
    with sdpa_kernel(SDPBackend.MATH):  # double backward through attention
        ref = dense_scores(
            model,
            [n for n, _ in model.named_parameters() if n.startswith(tuple(names))],
            lambda: [classification_loss(model, batch, i) for i in range(6)],
            lambda: [classification_loss(model, test, i) for i in range(6)],
            damping=1.0,
        )
    task = SequenceClassificationTask()
    for estimator in (Exact(damping=1.0), CG(damping=1.0, tol=1e-12)):
        inf = Influence(model, task, batch, estimator=estimator, params=names, batch_size=4).fit()
        torch.testing.assert_close(inf.scores(test), ref, rtol=1e-7, atol=1e-12)


def test_causal_lm_scores_match_a_dense_reference():
    model, batch = gpt2().eval(), lm_batch()
    names = ["transformer.h.0.attn.c_proj"]
    with sdpa_kernel(SDPBackend.MATH):
        ref = dense_scores(
            model,
            ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"],
            lambda: [lm_loss(model, batch, i, "sum") for i in range(6)],
            lambda: [lm_loss(model, batch, i, "sum") for i in (0, 4)],
            damping=50.0,
        )
    test = {k: v[[0, 4]] for k, v in batch.items()}
    inf = Influence(model, CausalLMTask(), batch, estimator=Exact(damping=50.0), params=names).fit()
    torch.testing.assert_close(inf.scores(test), ref, rtol=1e-7, atol=1e-12)


# ---- K-FAC on transformers layers ---------------------------------------------------------------


def test_conv1d_is_modelled_like_the_equivalent_linear():
    conv1d = transformers().pytorch_utils.Conv1D
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=F64), torch.randint(0, 3, (40,))
    linear = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    conv = nn.Sequential(conv1d(6, 5), nn.Tanh(), conv1d(3, 6)).double()
    with torch.no_grad():
        for lin, c in ((linear[0], conv[0]), (linear[2], conv[2])):
            c.weight.copy_(lin.weight.T)
            c.bias.copy_(lin.bias)
    task = ClassificationTask(weight_decay=1e-2)
    for estimator in (KFAC(damping=1e-3), EKFAC(damping=1e-3)):
        a = Influence(linear, task, (x, y), estimator=estimator).fit().scores((x[:3], y[:3]))
        b = Influence(conv, task, (x, y), estimator=estimator).fit().scores((x[:3], y[:3]))
        torch.testing.assert_close(b, a)


def test_ekfac_on_supported_layers_of_a_padded_bert():
    model, batch, test = bert(), padded(30, 3), padded(30, 3, seed=1)
    task = SequenceClassificationTask()
    with pytest.warns(UserWarning, match="leaves out") as record:
        inf = Influence(model, task, batch, estimator=EKFAC(damping=1e-3), params="supported")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert inf.fn.names == [f"{m}.{a}" for m in linear for a in ("weight", "bias")]
    message = str(record[0].message)
    for left_out in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.bias"):
        assert left_out in message
    assert torch.isfinite(inf.fit().scores(test)).all()
    # Against the exact Gauss-Newton on a layer inside attention (padding matters) and the head,
    # with the exact expectation over the labels (30 examples: one sampled label each is noisy).
    names = ["classifier", "bert.encoder.layer.0.attention.self.value"]
    estimator = EKFAC(damping=1e-3, fisher="exact")
    ekfac = Influence(model, task, batch, estimator=estimator, params=names).fit().scores(test)
    exact = (
        Influence(model, task, batch, estimator=Exact(damping=1e-3), params=names, curvature="gauss_newton")
        .fit()
        .scores(test)
    )
    assert torch.corrcoef(torch.stack([ekfac.flatten(), exact.flatten()]))[0, 1] > 0.99  # 0.99999 here


def test_default_influence_on_a_tiny_bert_returns_finite_scores_and_says_why():
    model, batch, task = bert().eval(), padded(30, 3), SequenceClassificationTask()
    inf = Influence(model, task, batch)  # no estimator: p = 3083 > 3000, EK-FAC over the Linear layers
    reason = inf.settings()["curvature"]["chosen_by_default"]
    assert "EK-FAC" in reason and "bert.embeddings.word_embeddings.weight" in reason
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert inf.fn.names == [f"{m}.{a}" for m in linear for a in ("weight", "bias")]
    scores = inf.fit().scores(batch)
    assert scores.shape == (6, 6) and torch.isfinite(scores).all()
    # Only the classifier: 51 parameters, Exact on the Hessian (undamped or damped, as its spectrum says)
    head = Influence(model, task, batch, params=["classifier"])
    assert isinstance(head.estimator, Exact) and torch.isfinite(head.fit().scores(batch)).all()


def test_ekfac_on_the_conv1d_layers_of_gpt2():
    model, batch = gpt2(), lm_batch()
    with pytest.warns(UserWarning, match="transformer.wte.weight") as record:
        inf = Influence(
            model,
            CausalLMTask(),
            batch,
            estimator=EKFAC(damping=1e-3, fisher="empirical"),
            params="supported",
        )
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert inf.fn.names == [f"{m}.{a}" for m in conv for a in ("weight", "bias")]
    assert "lm_head" not in str(record[0].message)  # tied to wte: one parameter, left out once
    # fit() checks every layer's rebuilt gradients against autograd's (the transposed index)
    scores = inf.fit().scores(per_token_examples(batch, index=2))
    assert scores.shape == (4, 6) and torch.isfinite(scores).all()


def test_a_tokenizer_batch_encoding_is_accepted_as_data():
    batch = padded(30, 3)
    encoding = transformers().BatchEncoding(batch)  # what a tokenizer returns: a Mapping, not a dict
    model, task = bert().eval(), SequenceClassificationTask()
    inf = Influence(model, task, encoding, params=["classifier"], estimator=CG(damping=0.1)).fit()
    plain = Influence(model, task, batch, params=["classifier"], estimator=CG(damping=0.1)).fit()
    torch.testing.assert_close(inf.scores(encoding), plain.scores(batch))


# ---- params="supported" -------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.depthwise = nn.Conv2d(2, 2, 3, groups=2)
        self.fc = nn.Linear(2, 3)
        self.tied = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)
        self.out.weight = self.tied.weight
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.depthwise(self.norm(self.conv(x))).mean((2, 3))
        return self.frozen(self.out(self.tied(self.fc(h))))


def test_supported_picks_exactly_the_linear_and_conv_parameters_and_warns():
    model = Mixed()
    with pytest.warns(UserWarning, match="leaves out 5") as record:
        names = KFAC().supported_parameters(model)
    assert names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "tied.bias", "out.bias"]
    message = str(record[0].message)
    for skipped in (
        "norm.weight (BatchNorm2d)",
        "depthwise.weight (Conv2d with groups=2)",
        "tied.weight (shared",
    ):
        assert skipped in message
    assert "frozen" not in message  # not trained: neither chosen nor reported


def test_supported_with_influence_fits_kfac_where_default_params_are_refused():
    model = Mixed().double()
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 6, 6, dtype=F64), torch.randint(0, 3, (12,))
    with pytest.raises(Exception, match="params='supported'"):
        Influence(model, ClassificationTask(), (x, y), estimator=KFAC(damping=1e-3)).fit()
    model.tied.weight.requires_grad_(False)  # a tied weight can stay only if it is not chosen
    with pytest.warns(UserWarning, match="leaves out"):
        inf = Influence(model, ClassificationTask(), (x, y), estimator=KFAC(damping=1e-3), params="supported")
    assert torch.isfinite(inf.fit().scores((x[:2], y[:2]))).all()


def test_supported_means_every_trainable_parameter_for_other_estimators():
    model = Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = CG().supported_parameters(model)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]


def test_supported_without_influence_says_where_it_is_resolved():
    with pytest.raises(TaskError, match="supported_parameters"):
        ModelFunction(Mixed(), ClassificationTask(), params="supported")


# ---- peft adapters ------------------------------------------------------------------------------


def test_lora_parameters_are_selected_by_name_and_the_base_stays_fixed():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        bert(), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    lora = adapter_parameters(model, heads=False)
    assert lora == [
        f"base_model.model.bert.encoder.layer.0.attention.self.{m}.lora_{ab}.default.weight"
        for m in ("query", "value")
        for ab in ("A", "B")
    ]
    with_head = adapter_parameters(model)
    assert with_head[:4] == lora and all("classifier.modules_to_save" in n for n in with_head[4:])
    assert with_head == [n for n, p in model.named_parameters() if p.requires_grad]
    batch = padded(30, 3)
    task = SequenceClassificationTask()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inf = Influence(model, task, batch, params=lora, estimator=CG(damping=1e-2), curvature="gauss_newton")
    assert inf.p == sum(dict(model.named_parameters())[n].numel() for n in lora)
    scores = inf.fit().scores(batch)
    # K-FAC models LoRA's A and B as the Linear layers they are.
    kfac = Influence(model, task, batch, params=lora, estimator=EKFAC(damping=1e-2)).fit().scores(batch)
    assert scores.shape == kfac.shape == (6, 6) and torch.isfinite(kfac).all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A frozen base weight is used when named.
    base = "base_model.model.bert.encoder.layer.0.attention.output.dense.weight"
    assert Influence(model, task, batch, params=[base]).p == 16 * 16


def test_no_adapters_is_a_clear_error():
    with pytest.raises(TaskError, match="get_peft_model"):
        adapter_parameters(nn.Linear(2, 2))


# ---- dict batches for ClassificationTask --------------------------------------------------------


def test_classification_task_names_the_fix_for_dict_batches():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    with pytest.raises(TaskError, match=r"ClassificationTask\(input_key=\.\.\., label_key=\.\.\.\)"):
        Influence(model, ClassificationTask(), {"x": x, "y": y}).fit()
    with pytest.raises(TaskError, match="SequenceClassificationTask"):
        ModelFunction(model, ClassificationTask()).check({"input_ids": x, "labels": y})
    task = ClassificationTask(weight_decay=0.1, input_key="x", label_key="y")
    a = Influence(model, task, {"x": x, "y": y}, estimator=Exact()).fit().scores({"x": x[:2], "y": y[:2]})
    b = Influence(model, ClassificationTask(weight_decay=0.1), (x, y), estimator=Exact()).fit()
    torch.testing.assert_close(a, b.scores((x[:2], y[:2])))
    assert task.settings()["input_key"] == "x" and "input_key" not in ClassificationTask().settings()


# ---- the user's module state --------------------------------------------------------------------


def test_influence_computes_in_eval_mode_and_restores_the_users_mode():
    model, batch = bert(), padded(30, 3)
    model.train()
    model.bert.pooler.eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    task = SequenceClassificationTask()
    inf = Influence(model, task, batch, params=["classifier"], estimator=CG(damping=0.1)).fit()
    scores = inf.scores(batch)
    predicted = predictions(task, model, batch)
    assert {n: m.training for n, m in model.named_modules()} == modes
    # dropout was off: the same numbers again, and as from a model put in eval mode by the user
    torch.testing.assert_close(inf.scores(batch), scores, rtol=0, atol=0)
    model.eval()
    again = Influence(model, task, batch, params=["classifier"], estimator=CG(damping=0.1)).fit()
    torch.testing.assert_close(again.scores(batch), scores)
    torch.testing.assert_close(predictions(task, model, batch), predicted)
    assert not model.training


# ---- a DataLoader that pads each batch on its own ------------------------------------------------


def pad_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A tokenizer-like collate: right-pad to the batch's longest sequence, mask and labels."""
    ids = nn.utils.rnn.pad_sequence([item["input_ids"] for item in items], batch_first=True)  # pad id 0
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    labels = torch.stack([item["labels"] for item in items])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def ragged(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` unpadded examples of 2 to 11 tokens (ids 1..29, 0 is padding) with labels in 0..2."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=gen).tolist()
    ids = [torch.randint(1, 30, (t,), generator=gen) for t in lengths]
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels, strict=True)]


@pytest.mark.parametrize(
    "estimator, params, curvature",
    [
        (Exact(damping=0.1), ["classifier", "bert.encoder.layer.0.attention.self.value"], None),
        (CG(damping=1e-3, tol=1e-12), None, "gauss_newton"),
        (EKFAC(relative_damping=0.1), "supported", None),  # input factors over real tokens only
        (KFAC(relative_damping=0.1), "supported", None),
    ],
    ids=["exact", "cg", "ekfac", "kfac"],
)
def test_a_dataloader_padding_each_batch_gives_the_scores_of_one_padded_tensor(estimator, params, curvature):
    train_items, test_items = ragged(16, seed=0), ragged(5, seed=1)
    loader = torch.utils.data.DataLoader(train_items, batch_size=8, collate_fn=pad_batch)
    test_loader = torch.utils.data.DataLoader(test_items, batch_size=8, collate_fn=pad_batch)
    widths = {pad_batch(train_items[i : i + 4])["input_ids"].shape[1] for i in range(0, 16, 4)}
    assert len(widths) > 1  # the batches below really are padded to different lengths
    model, task = bert().eval(), SequenceClassificationTask()
    options = {"estimator": estimator, "params": params, "curvature": curvature}
    options |= {"batch_size": 4, "hessian_batch_size": 4}  # several batches, each padded to its own width
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*leaves out.*")
        per_batch = Influence(model, task, loader, **options).fit()
        whole = Influence(model, task, pad_batch(train_items), **options).fit()
    expected = whole.scores(pad_batch(test_items))  # (5, 16), every sequence padded to one length
    torch.testing.assert_close(per_batch.scores(test_loader), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(per_batch.scores(pad_batch(test_items)), expected, rtol=1e-9, atol=1e-12)


def test_a_collate_returning_a_tokenizer_batch_encoding_is_accepted():
    # What transformers' DataCollatorWithPadding returns: a BatchEncoding, a Mapping that is not a dict.
    encode = transformers().BatchEncoding
    train_items, test_items = ragged(16, seed=0), ragged(5, seed=1)
    loader = torch.utils.data.DataLoader(train_items, collate_fn=lambda items: encode(pad_batch(items)))
    model, task = bert().eval(), SequenceClassificationTask()
    options = {"estimator": CG(damping=0.1), "params": ["classifier"], "batch_size": 4}
    per_batch = Influence(model, task, loader, **options).fit()
    whole = Influence(model, task, pad_batch(train_items), **options).fit()
    expected = whole.scores(pad_batch(test_items))
    torch.testing.assert_close(per_batch.scores(pad_batch(test_items)), expected, rtol=1e-9, atol=1e-12)
