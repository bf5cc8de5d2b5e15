"""The gradient store collected during training against the post-hoc store at the same checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from torch import nn
from torch.func import grad

from influencer import ClassificationTask, Influence
from influencer.errors import ConfigError
from influencer.index import (
    CheckpointStores,
    GaussianProjector,
    GradientIndex,
    IndexStoreError,
    KroneckerProjector,
    NoPreconditioner,
    TrainingStore,
    TrainingStoreSettings,
)
from influencer.index.training import load_model_state
from influencer.models import MLP, SmallCNN

N, BATCH = 256, 64  # powers of two: rescaling the batch-mean loss's gradients is exact


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


class _Shared(nn.Module):
    """A layer called three times (its calls' products summed in call order) after an output
    edited in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(10, 6), nn.ReLU(inplace=True)
        self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        for _ in range(3):
            h = torch.tanh(self.b(h))
        return self.head(h)


def _problem(kind: str):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        x, model = torch.randn(N, 10, generator=gen), MLP(10, (16,), 3)
    elif kind == "shared":
        x, model = torch.randn(N, 10, generator=gen), _Shared()
    else:
        x, model = torch.randn(N, 1, 8, 8, generator=gen), SmallCNN(3, 4)
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, ClassificationTask(weight_decay=1e-2), (x, y)


def _state(model):
    return [p.detach().clone() for p in model.parameters()]


def _load(model, state):
    with torch.no_grad():
        for p, t in zip(model.parameters(), state, strict=True):
            p.copy_(t)


def _full_batch_training(model, task, data, store, lrs):
    """One optimizer step per epoch, its gradient accumulated over micro-batches in id order."""
    x, y = data
    states = []
    for lr in lrs:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        states.append(_state(model))
        opt.zero_grad()
        for ids in torch.arange(N).split(BATCH):
            with store.step(ids, lr=lr):
                loss = task.loss(model, (x[ids], y[ids])).sum() / N
                (loss + task.regularizer(dict(model.named_parameters())) * len(ids) / N).backward()
        opt.step()
    return states


@pytest.mark.parametrize("kind", ["mlp", "cnn", "shared"])
@pytest.mark.parametrize("basis", ["random", "pca"])
def test_store_of_a_full_batch_window_equals_the_post_hoc_store_bit_for_bit(tmp_path, kind, basis):
    """Every step projected in its backward pass (``hold_mb=0``), in the post-hoc store's batches:
    the same operations on the same values. (Held steps are projected in larger batches, which a
    BLAS may round differently: see the test of held steps below.)"""
    model, task, data = _problem(kind)
    projector = KroneckerProjector(k_in=4, k_out=3, basis=basis, pca_examples=100)
    settings = TrainingStoreSettings(
        checkpoints=(0, 4), projector=projector, loss_scale=float(N), fisher="layers", hold_mb=0
    )
    store = TrainingStore(model, task, data, tmp_path / "train", settings, batch_size=BATCH)
    states = _full_batch_training(model, task, data, store, lrs=(0.5, 0.25))
    written = store.finish()
    assert [p.name for p in written] == ["step-00000000", "step-00000004"]
    for state, path in zip(states, written, strict=True):
        _load(model, state)
        inf = Influence(model, task, data, batch_size=BATCH)
        post = GradientIndex.build(inf, tmp_path / f"post-{path.name}", projector)
        ours = GradientIndex.open(path, inf)
        assert {k: v for k, v in ours.header.items() if k != "training"} == post.header
        assert torch.equal(ours.gradients(), post.gradients())
        assert torch.equal(ours.fisher(), post.fisher())
        assert torch.equal(ours.regularizer(), post.regularizer())
        assert ours.gradients().abs().max() > 0.1  # not a store of zeros


def test_a_step_backpropagated_in_two_passes_stores_their_summed_gradients(tmp_path):
    """``backward(retain_graph=True)`` twice in one step: the rows add up, as ``.grad`` does (halves
    of the loss, so the sum is exactly the post-hoc row)."""
    model, task, data = _problem("mlp")
    x, y = data
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector, loss_scale=float(N))
    store = TrainingStore(model, task, data, tmp_path / "train", settings, batch_size=BATCH)
    state = _state(model)
    for ids in torch.arange(N).split(BATCH):
        with store.step(ids, lr=0.1):
            loss = task.loss(model, (x[ids], y[ids])).sum() / N
            half = (loss + task.regularizer(dict(model.named_parameters())) * len(ids) / N) / 2
            half.backward(retain_graph=True)
            half.backward()
    inf = Influence(model, task, data, batch_size=BATCH)
    assert all(torch.equal(a, b) for a, b in zip(_state(model), state, strict=True))  # no step taken
    post = GradientIndex.build(inf, tmp_path / "post", projector)
    assert torch.equal(GradientIndex.open(store.finish()[0], inf).gradients(), post.gradients())


def test_other_batches_agree_with_the_post_hoc_store_to_float32_rounding(tmp_path):
    model, task, data = _problem("cnn")  # convolutions (padding, stride 2) and a linear head
    projector = KroneckerProjector(k_in=5, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector, loss_scale=float(N))
    store = TrainingStore(model, task, data, tmp_path / "train", settings)
    (state,) = _full_batch_training(model, task, data, store, lrs=(0.5,))
    _load(model, state)
    inf = Influence(model, task, data)
    post = GradientIndex.build(inf, tmp_path / "post", projector).gradients()
    ours = GradientIndex.open(store.finish()[0], inf).gradients()
    err = (ours - post).norm(dim=1) / post.norm(dim=1)
    assert float(err.max()) < 1e-5 and float(post.norm(dim=1).min()) > 1e-3


def _pca_windows_and_post_hoc(model, task, data, path):
    """Per window of a store with a PCA basis at steps 0 and 4 of full-batch training (learning rates
    0.5, 0.25): its rows and the post-hoc store's at the same parameters."""
    projector = KroneckerProjector(k_in=4, k_out=3, basis="pca", pca_examples=100)
    settings = TrainingStoreSettings(checkpoints=(0, 4), projector=projector, loss_scale=float(N))
    store = TrainingStore(model, task, data, path / "train", settings, batch_size=BATCH)
    states = _full_batch_training(model, task, data, store, lrs=(0.5, 0.25))
    pairs = []
    for state, written in zip(states, store.finish(), strict=True):
        _load(model, state)
        inf = Influence(model, task, data, batch_size=BATCH)
        post = GradientIndex.build(inf, path / f"post-{written.name}", projector).gradients()
        pairs.append((GradientIndex.open(written, inf).gradients(), post))
    return pairs


def test_a_window_still_projecting_keeps_its_pca_basis_when_the_next_one_fits_its_own(tmp_path, monkeypatch):
    """Back-to-back windows with a PCA basis: the next window fits its basis at its first step,
    while the writer thread may still be projecting the closed window's held steps (made slow
    here), which must use the closed window's basis."""
    import time

    import influencer.index.training as training

    project = training._Window.project

    def slow(self, *args):
        time.sleep(0.3)
        project(self, *args)

    monkeypatch.setattr(training._Window, "project", slow)
    model, task, data = _problem("mlp")
    for ours, post in _pca_windows_and_post_hoc(model, task, data, tmp_path):
        torch.testing.assert_close(ours, post, rtol=0, atol=1e-6 * float(post.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_training_store_equals_the_post_hoc_store(tmp_path):
    model, task, (x, y) = _problem("cnn")
    model, data = model.cuda(), (x.cuda(), y.cuda())
    for ours, post in _pca_windows_and_post_hoc(model, task, data, tmp_path):
        assert ours.is_cuda and float((ours - post).norm() / post.norm()) < 1e-5
    stores = CheckpointStores.open(tmp_path / "train", model, task, data)
    assert stores.scores((data[0][:3], data[1][:3])).is_cuda


def _batches(sampling: str, gen: torch.Generator, sizes=(32,), opens: int = 2):
    """Batches of ``sizes`` in turn: two shuffled epochs, or drawn with replacement (ids repeat
    within a batch and across batches) until every id was drawn from step ``opens`` on."""
    size = itertools.cycle(sizes)
    if sampling == "shuffled":
        for _ in range(2):
            lengths = []
            while sum(lengths) < N:
                lengths.append(min(next(size), N - sum(lengths)))
            yield from torch.randperm(N, generator=gen).split(lengths)
        return
    drawn = torch.zeros(N, dtype=torch.bool)
    step = 0
    while not drawn.all():
        ids = torch.randint(0, N, (next(size),), generator=gen)
        ids[5] = ids[3]  # at least one id twice in every batch
        if step >= opens:
            drawn[ids] = True
        step += 1
        yield ids


@pytest.mark.parametrize("sampling", ["shuffled", "with replacement"])
def test_rows_of_an_sgd_window_are_each_steps_gradients(tmp_path, sampling):
    """Parameters move every step: row i is the loss gradient at the step that first saw i in the
    window (an id repeated in a batch: its first position), plus the regulariser's gradient at the
    checkpoint."""
    model, task, (x, y) = _problem("mlp")
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(2,), projector=projector)
    store = TrainingStore(model, task, (x, y), tmp_path, settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(1)
    seen = []  # (ids, parameters before the step)
    for ids in _batches(sampling, gen):
        seen.append((ids, _state(model)))
        with store.step(ids, lr=0.3):
            loss = task.loss(model, (x[ids], y[ids])).mean()
            opt.zero_grad()
            (loss + task.regularizer(dict(model.named_parameters()))).backward()
        opt.step()
    (path,) = store.finish()
    window = seen[2:]  # from checkpoint step 2 until every example was seen (in the next epoch)
    _load(model, window[0][1])
    inf = Influence(model, task, (x, y))
    index = GradientIndex.open(path, inf)
    fn, proj = inf.fn, index.projection

    def flat(state):
        return torch.cat([t.reshape(-1) for t in state])

    def reg(theta):
        return proj.project(grad(fn.regularizer)(theta)[None])[0]

    expected = torch.empty(N, index.k)
    filled = torch.zeros(N, dtype=torch.bool)
    for ids, state in window:
        theta = flat(state)
        rows = proj.gradients(fn, theta, (x[ids], y[ids]), "loss") - reg(theta) + reg(inf.theta)
        for position, i in enumerate(ids.tolist()):  # an example's first visit in the window
            if not filled[i]:
                expected[i], filled[i] = rows[position], True
    assert filled.all()
    got = index.gradients()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(got, expected + 1e-3)


def _sgd_store(path, kind, hold_mb, sampling, refill=False):
    """A store of one window of SGD steps on batches of 32, 17 and 15 in turn (three shapes), the
    loss scale a callable with one factor per example; with ``refill``, each batch is copied into
    one input tensor the training loop reuses."""
    model, task, (x, y) = _problem(kind)
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")

    def per_example(ids):  # the loss below weighs each example's loss by 1 / this
        return 1.0 + (torch.as_tensor(ids) % 3).double()

    settings = TrainingStoreSettings(
        checkpoints=(1,), projector=projector, loss_scale=per_example, hold_mb=hold_mb
    )
    store = TrainingStore(model, task, (x, y), path, settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    buffer = torch.empty(32, *x.shape[1:])
    for ids in _batches(sampling, torch.Generator().manual_seed(1), sizes=(32, 17, 15), opens=1):
        inputs = buffer[: len(ids)].copy_(x[ids]) if refill else x[ids]
        with store.step(ids, lr=0.3):
            weights = (1.0 / per_example(ids)).float()
            loss = (task.loss(model, (inputs, y[ids])) * weights).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
    (written,) = store.finish()
    load_model_state(model, written)  # the model at the checkpoint, which the store is of
    return GradientIndex.open(written, Influence(model, task, (x, y))).gradients()


@pytest.mark.parametrize("sampling", ["shuffled", "with replacement"])
@pytest.mark.parametrize("kind", ["cnn", "shared"])
def test_held_steps_give_the_rows_of_steps_projected_in_their_backward_pass(tmp_path, sampling, kind):
    """Steps held and projected together in the writer thread (the whole window, or groups of a
    few steps submitted while it is open) against every step projected in its own backward pass:
    batches of three sizes, ids repeated and seen before, a loss scale per example, a layer called
    three times, an input batch the training loop refills in place after every step."""
    alone = _sgd_store(tmp_path / "alone", kind, 0.0, sampling)
    top = float(alone.abs().max())
    assert top > 0.1
    for hold_mb in (32.0, 0.02):  # everything held; a group every few steps
        for refill in (False, True):
            held = _sgd_store(tmp_path / f"held-{hold_mb}-{refill}", kind, hold_mb, sampling, refill)
            # a product over more rows may round differently (the BLAS picks its kernel by size)
            torch.testing.assert_close(held, alone, rtol=0, atol=1e-6 * top, msg=str((hold_mb, refill)))


def test_a_later_window_copies_its_steps_into_the_buffers_of_an_earlier_ones(tmp_path):
    """The buffers a window's held steps are copied into go back once projected and hold the next
    window's steps; both windows' rows are those of steps projected in their backward passes."""
    model0, task, (x, y) = _problem("cnn")
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    rows, pointers = {}, []
    for hold_mb in (32.0, 0.0):
        model = copy.deepcopy(model0)
        settings = TrainingStoreSettings(checkpoints=(0, 8), projector=projector, hold_mb=hold_mb)
        store = TrainingStore(model, task, (x, y), tmp_path / f"hold-{hold_mb}", settings)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for step, ids in enumerate(
            torch.randperm(N, generator=torch.Generator().manual_seed(2)).repeat(3).split(32)
        ):
            with store.step(ids, lr=0.3):
                opt.zero_grad()
                task.loss(model, (x[ids], y[ids])).mean().backward()
            opt.step()
            if hold_mb and step in (7, 15):  # each window's last step: its group is projected
                store.flush()
                ((_, tensors),) = store.buffers._idle
                pointers.append(
                    [t.data_ptr() for layer in tensors for call in layer for t in call if t is not None]
                )
        rows[hold_mb] = []
        for path in store.finish():
            load_model_state(model, path)
            rows[hold_mb].append(GradientIndex.open(path, Influence(model, task, (x, y))).gradients())
    assert pointers[0] == pointers[1]
    for held, alone in zip(rows[32.0], rows[0.0], strict=True):
        torch.testing.assert_close(held, alone, rtol=0, atol=1e-6 * float(alone.abs().max()))


def _one_window_store(model_class, path):
    """The MLP problem's task and data with a ``model_class()`` model, and a store of one window
    opening at step 0."""
    _, task, data = _problem("mlp")
    torch.manual_seed(0)
    model = model_class()
    settings = TrainingStoreSettings(
        checkpoints=(0,), projector=KroneckerProjector(k_in=4, k_out=3, basis="random")
    )
    return model, task, data, TrainingStore(model, task, data, path, settings)


class _TwoLayers(nn.Module):
    """Two linear layers, ``a`` (10 -> 6) and ``b`` (6 -> 3), for models whose forward pass does
    something the store must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(10, 6), nn.Linear(6, 3)


class _KeepsInput(_TwoLayers):
    """Keeps its head's input (an activation of its graph) where the training loop can reach it."""

    def forward(self, x):
        self.kept = torch.tanh(self.a(x)) + 0.0
        return self.b(self.kept)


def _edited_after_steps(path, edit):
    """A one-window store of the MLP problem's data with :class:`_KeepsInput`, whose head input is
    doubled in place after a held step (with ``edit``)."""
    model, task, (x, y), store = _one_window_store(_KeepsInput, path)
    for step, ids in enumerate(torch.arange(N).split(BATCH)):
        with store.step(ids, lr=0.1):
            task.loss(model, (x[ids], y[ids])).mean().backward()
        if step == 2 and edit:  # a held step (the first is projected at once, for the first batch's check)
            with torch.no_grad():
                model.kept.mul_(2.0)
    return model, task, (x, y), store


def test_a_held_step_is_copied_so_an_activation_edited_after_it_changes_nothing(tmp_path):
    """A held step's inputs and output gradients are copied at its end: an activation training
    edits in place afterwards leaves the store as it is without the edit, bit for bit."""
    stores = []
    for edit in (False, True):
        model, task, data, store = _edited_after_steps(tmp_path / f"edit-{edit}", edit)
        (path,) = store.finish()
        stores.append(GradientIndex.open(path, Influence(model, task, data)).gradients())
    assert torch.equal(stores[0], stores[1])
    assert float(stores[0].abs().max()) > 0.01


class _DoublesGradient(_TwoLayers):
    """Doubles its head's output gradient in place, in a hook of its own (after the store's)."""

    def forward(self, x):
        out = self.b(torch.tanh(self.a(x)))
        if out.requires_grad:
            out.register_hook(lambda g: g.mul_(2.0))
        return out


def test_an_output_gradient_edited_in_place_before_its_step_ended_is_refused_in_a_held_step(tmp_path):
    """A held step copies its output gradients at its end: one edited in place after the store's
    hook saw it (here by a later hook of the model's) is refused, naming the layer."""
    _, task, (x, y) = _problem("mlp")
    model = _DoublesGradient()
    projector = KroneckerProjector(k_in=2, k_out=2, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector, check=False)
    store = TrainingStore(model, task, (x, y), tmp_path, settings)
    ids = torch.arange(BATCH)
    with store.step(ids, lr=0.1):  # the window's first step: projected in its backward pass
        task.loss(model, (x[ids], y[ids])).mean().backward()
    with (
        pytest.raises(ConfigError, match="output gradient of layer 'b' was modified in place"),
        store.step(ids + BATCH, lr=0.1),
    ):
        task.loss(model, (x[ids + BATCH], y[ids + BATCH])).mean().backward()


class _SqueezesSingles(_TwoLayers):
    """Runs its head on an unbatched input when the batch holds one example."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h[0])[None] if len(x) == 1 else self.b(h)


@pytest.mark.parametrize("hold_mb", [32.0, 0.0])
def test_a_layer_input_not_batch_first_is_refused_in_a_held_step_as_in_one_projected_alone(tmp_path, hold_mb):
    """A held step whose layer input is not batch-first cannot be copied into a group: it is
    projected at the step's end, and the layer's error names it, as in a step projected in its
    backward pass."""
    _, task, (x, y) = _problem("mlp")
    model = _SqueezesSingles()
    settings = TrainingStoreSettings(
        checkpoints=(0,), projector=KroneckerProjector(k_in=2, k_out=2, basis="random"), hold_mb=hold_mb
    )
    store = TrainingStore(model, task, (x, y), tmp_path, settings)
    for ids in (torch.arange(0, 64), torch.arange(64, 128)):  # the first projected alone, for the check
        with store.step(ids, lr=0.1):
            task.loss(model, (x[ids], y[ids])).mean().backward()
    ids = torch.tensor([128])
    with pytest.raises(ConfigError, match=r"layer 'b' got an input of shape \(6,\)"), store.step(ids, lr=0.1):
        task.loss(model, (x[ids], y[ids])).mean().backward()


def test_ids_as_lists_or_numpy_arrays_give_the_same_store_and_out_of_range_ids_are_refused(tmp_path):
    import numpy as np

    from influencer.errors import DataError

    model, task, (x, y) = _problem("mlp")
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    stores = []
    for form in (lambda t: t, lambda t: t.tolist(), lambda t: t.numpy().astype(np.int32)):
        store = TrainingStore(model, task, (x, y), tmp_path / f"s{len(stores)}", settings)
        for ids in order.split(BATCH):  # the model does not move: the rows depend on the ids only
            with store.step(form(ids), lr=0.1):
                task.loss(model, (x[ids], y[ids])).mean().backward()
            model.zero_grad()
        (path,) = store.finish()
        stores.append(GradientIndex.open(path, Influence(model, task, (x, y))).gradients())
    assert torch.equal(stores[0], stores[1]) and torch.equal(stores[0], stores[2])
    store = TrainingStore(model, task, (x, y), tmp_path / "bad", settings)
    for bad in (torch.tensor([0, N]), [-1, 2]):
        with pytest.raises(DataError, match=rf"must lie in \[0, {N}\)"), store.step(bad, lr=0.1):
            pass
    assert store.steps == 0


def test_the_finiteness_check_looks_at_every_entry_when_the_sum_overflows():
    """The window's rows are checked by their sum first; a sum that overflows while every entry is
    finite is no error, and a non-finite entry is named by its example."""
    from influencer.errors import NonFiniteError
    from influencer.index.training import check_finite_rows

    rows = torch.full((5, 3), 3e38)  # finite, float32's largest range
    assert not torch.isfinite(rows.sum())
    check_finite_rows(rows, step=0)
    rows[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[3\] in the window of step 7"):
        check_finite_rows(rows, step=7)
    check_finite_rows(torch.zeros(5, 3), step=0)


class _EditsInput(_TwoLayers):
    """A layer whose input is edited in place after the layer ran (and before the backward pass)."""

    def forward(self, x):
        h = torch.tanh(self.a(x)) + 0.0  # (a copy: tanh's own output stays as autograd saved it)
        out = self.b(h)
        h.mul_(2.0)
        return out


def test_an_input_edited_in_place_after_its_layer_ran_is_refused(tmp_path):
    """The inputs are projected in the backward pass: an input changed in between would give wrong
    rows, so it is refused, naming the layer."""
    model, task, (x, y), store = _one_window_store(_EditsInput, tmp_path)
    ids = torch.arange(BATCH)
    with (
        pytest.raises(ConfigError, match="input of layer 'b' was modified in place"),
        store.step(ids, lr=0.1),
    ):
        task.loss(model, (x[ids], y[ids])).mean().backward()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_store_collected_under_autocast_is_the_post_hoc_store_to_half_precision(tmp_path, kind):
    """Mixed precision: activations and output gradients in bfloat16 are projected in the factors'
    float32 (in the backward pass, outside autocast); the rows match the float32 post-hoc store to
    bfloat16 rounding."""
    model, task, (x, y) = _problem(kind)
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector)  # checked to bfloat16's rounding
    store = TrainingStore(model, task, (x, y), tmp_path, settings)
    for ids in torch.arange(N).split(BATCH):  # the model does not move: every row at theta_0
        with store.step(ids, lr=0.1):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward pass only, as AMP does
                loss = task.loss(model, (x[ids], y[ids])).mean()
            loss.backward()
        model.zero_grad()
    (path,) = store.finish()
    inf = Influence(model, task, (x, y))
    ours = GradientIndex.open(path, inf).gradients()
    post = GradientIndex.build(inf, tmp_path / "post", projector).gradients()
    assert ours.dtype == post.dtype == torch.float32
    err = float((ours - post).norm() / post.norm())
    assert 1e-6 < err < 5e-2  # bfloat16's rounding, not float32's, and no more
    # the first batch's check still catches a loss that is not the declared one
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector, loss_scale="sum")
    store = TrainingStore(model, task, (x, y), tmp_path / "sum", settings)
    ids = torch.arange(BATCH)
    with pytest.raises(ConfigError, match=r"up to torch.bfloat16 rounding"), store.step(ids, lr=0.1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task.loss(model, (x[ids], y[ids])).mean()
        loss.backward()


def test_checkpoint_stores_sum_the_post_hoc_scores_with_the_learning_rates(tmp_path):
    model, task, data = _problem("mlp")
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0, 4), projector=projector, loss_scale=float(N))
    store = TrainingStore(model, task, data, tmp_path / "train", settings, batch_size=BATCH)
    lrs = (0.5, 0.125)
    states = _full_batch_training(model, task, data, store, lrs=lrs)
    store.finish()
    test = (data[0][:5] + 0.1, data[1][:5])
    expected = torch.zeros(5, N)
    probe = copy.deepcopy(model)
    for lr, state in zip(lrs, states, strict=True):
        _load(probe, state)
        post = GradientIndex.build(Influence(probe, task, data), tmp_path / f"post-{lr}", projector)
        expected += lr * post.scores(test, preconditioner=NoPreconditioner())
    before = _state(model)
    stores = CheckpointStores.open(tmp_path / "train", model, task, data)
    assert stores.lrs == list(lrs)
    assert all(torch.equal(a, b) for a, b in zip(_state(model), before, strict=True))  # left alone
    scores = stores.scores(test)
    # the post-hoc store ran other batches (its default batch size): float32 agreement
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(scores, expected * 1.001, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    top = stores.top_k(test, k=7, block=2)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(top.helpful_ids, order)
    assert torch.allclose(top.helpful_scores, scores.gather(1, order))
    low = torch.sort(scores, dim=1, stable=True).indices[:, :7]
    assert torch.equal(top.harmful_ids, low)


def test_the_first_batch_check_catches_a_loss_that_is_not_the_declared_one(tmp_path):
    model, task, (x, y) = _problem("mlp")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=KroneckerProjector(k_in=4, k_out=3))
    store = TrainingStore(model, task, (x, y), tmp_path, settings)
    ids = torch.arange(BATCH)
    with pytest.raises(ConfigError, match="loss_scale"), store.step(ids, lr=0.1):
        task.loss(model, (x[ids], y[ids])).sum().backward()  # a sum, declared as the mean


def test_an_unfinished_window_and_overlapping_windows_are_refused(tmp_path):
    model, task, (x, y) = _problem("mlp")
    projector = KroneckerProjector(k_in=2, k_out=2, basis="random")
    store = TrainingStore(
        model, task, (x, y), tmp_path, TrainingStoreSettings(checkpoints=(0, 1), projector=projector)
    )
    ids = torch.arange(BATCH)
    with store.step(ids, lr=0.1):
        task.loss(model, (x[ids], y[ids])).mean().backward()
    with pytest.raises(IndexStoreError, match="one epoch apart"), store.step(ids, lr=0.1):
        pass
    store = TrainingStore(
        model, task, (x, y), tmp_path / "b", TrainingStoreSettings(checkpoints=(0,), projector=projector)
    )
    with store.step(ids, lr=0.1):
        task.loss(model, (x[ids], y[ids])).mean().backward()
    with pytest.raises(IndexStoreError, match=f"saw {BATCH} of {N}"):
        store.finish()
    # a window writes its files only when it closes: an unfinished one leaves no store
    with pytest.raises(IndexStoreError, match="holds no gradient index"):
        GradientIndex.open(tmp_path / "b" / "step-00000000", Influence(model, task, (x, y)))


class _Counting(nn.Module):
    """An MLP with a buffer that training changes in place at every forward pass (as batch
    normalisation's running statistics), which its outputs do not read."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(10, (16,), 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.net(x)


def _one_epoch(model, task, data, store, lr=0.1):
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for ids in torch.randperm(N, generator=torch.Generator().manual_seed(1)).split(BATCH):
        with store.step(ids, lr=lr):
            opt.zero_grad()
            task.loss(model, (x[ids], y[ids])).mean().backward()
        opt.step()


def test_the_fingerprint_is_the_model_at_the_checkpoint_though_training_changes_its_buffers(tmp_path):
    """The header is hashed when the window is written, after steps that changed the weights and
    the buffer in place: it is still the model at theta_s, which opens the store (the model after
    training does not)."""
    torch.manual_seed(0)
    model, (task, data) = _Counting(), _problem("mlp")[1:]
    model.train()
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    store = TrainingStore(
        model, task, data, tmp_path / "train", TrainingStoreSettings(checkpoints=(0,), projector=projector)
    )
    at_checkpoint = copy.deepcopy(model)
    _one_epoch(model, task, data, store)
    (path,) = store.finish()
    assert model.calls == N // BATCH
    GradientIndex.open(path, Influence(at_checkpoint, task, data))  # the model at theta_s: opens
    with pytest.raises(IndexStoreError, match=r"another model.*\(model\.state\)"):
        GradientIndex.open(path, Influence(model, task, data))
    with torch.no_grad():  # the weights at theta_s, the buffer after training: refused too
        for p, q in zip(model.parameters(), at_checkpoint.parameters(), strict=True):
            p.copy_(q)
    with pytest.raises(IndexStoreError, match=r"another model.*\(model\.state\)"):
        GradientIndex.open(path, Influence(model, task, data))


def test_a_checkpoint_whose_store_is_there_is_skipped_and_one_from_other_inputs_refused(tmp_path):
    """Training again into the same directory: a complete store of the same inputs (the same model
    at the checkpoint) is kept, not collected again; another model's is refused, or replaced with
    ``overwrite``."""
    model, task, data = _problem("mlp")
    projector = KroneckerProjector(k_in=4, k_out=3, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0,), projector=projector)
    initial = copy.deepcopy(model)
    first = TrainingStore(model, task, data, tmp_path, settings)
    _one_epoch(model, task, data, first)
    (path,) = first.finish()
    rows = GradientIndex.open(path, Influence(initial, task, data)).gradients()

    again = copy.deepcopy(initial)
    store = TrainingStore(again, task, data, tmp_path, settings)
    _one_epoch(again, task, data, store)
    assert store._writer is None  # nothing collected, nothing written
    assert store.finish() == [path]
    assert torch.equal(GradientIndex.open(path, Influence(initial, task, data)).gradients(), rows)

    other = copy.deepcopy(initial)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    store = TrainingStore(other, task, data, tmp_path, settings)
    with pytest.raises(IndexStoreError, match="other inputs"):
        _one_epoch(other, task, data, store)
    at_checkpoint = copy.deepcopy(other)
    store = TrainingStore(other, task, data, tmp_path, dataclasses.replace(settings, overwrite=True))
    _one_epoch(other, task, data, store)
    assert store.finish() == [path]
    replaced = GradientIndex.open(path, Influence(at_checkpoint, task, data)).gradients()
    assert not torch.allclose(replaced, rows)


def test_a_failed_write_of_a_closed_window_is_raised(tmp_path, monkeypatch):
    """The files of a closed window are written beside training; an error there is raised by
    flush(), the next window's close or finish(), never lost."""
    import influencer.index.training as training

    def fail(layout, *args):
        raise OSError(f"disk full writing {layout.root.name}")

    monkeypatch.setattr(training, "_write_store", fail)
    model, task, data = _problem("mlp")
    projector = KroneckerProjector(k_in=2, k_out=2, basis="random")
    settings = TrainingStoreSettings(checkpoints=(0, 4), projector=projector, loss_scale=float(N))
    store = TrainingStore(model, task, data, tmp_path, settings)
    _full_batch_training(model, task, data, store, lrs=(0.5,))  # steps 0-3: one window
    with pytest.raises(OSError, match="disk full writing step-00000000"):
        store.flush()  # the closed window's write, waited for
    store.flush()  # raised once
    _full_batch_training(model, task, data, store, lrs=(0.5,))  # steps 4-7: the next window
    with pytest.raises(OSError, match="disk full writing step-00000004"):
        store.finish()


def _blocked_writer_store(tmp_path, monkeypatch, cores, **settings):
    """A store whose first window (steps 0-3) closed and whose writer is stuck writing its files
    until the returned event is set; ``usable_cores()`` says ``cores``."""
    import threading

    import influencer._kernel.threads as threads
    import influencer.index.training as training

    release = threading.Event()
    write = training._write_store

    def blocked(*args):
        release.wait(30)
        write(*args)

    monkeypatch.setattr(training, "_write_store", blocked)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    model, task, data = _problem("mlp")
    projector = KroneckerProjector(k_in=2, k_out=2, basis="random")
    store = TrainingStore(
        model,
        task,
        data,
        tmp_path,
        TrainingStoreSettings(checkpoints=(0,), projector=projector, loss_scale=float(N), **settings),
    )
    _full_batch_training(model, task, data, store, lrs=(0.5,))
    x, y = data

    def step() -> int:
        """One more training step; torch's threads inside it."""
        with store.step(torch.arange(BATCH), lr=0.5):
            task.loss(model, (x[:BATCH], y[:BATCH])).mean().backward()
            return torch.get_num_threads()

    return store, release, step


def test_training_runs_on_one_thread_fewer_while_the_writer_works_when_its_threads_fill_the_cores(
    tmp_path, monkeypatch
):
    """While the writer writes the closed window's files, the steps of a training loop whose
    threads fill the cores run on one fewer; the first step after it is done (or flush()) puts the
    number back, and a number the training loop set meanwhile is kept."""
    torch.set_num_threads(2)  # (the one_thread fixture restores the session's)
    store, release, step = _blocked_writer_store(tmp_path, monkeypatch, cores=2)
    assert step() == 1 and step() == 1  # the writer busy
    release.set()
    store.flush()
    assert torch.get_num_threads() == 2
    assert step() == 2
    assert store.finish() and torch.get_num_threads() == 2

    store, release, step = _blocked_writer_store(tmp_path / "b", monkeypatch, cores=2)
    assert step() == 1
    torch.set_num_threads(3)  # the training loop's own choice, between steps
    release.set()
    store.finish()
    assert torch.get_num_threads() == 3

    torch.set_num_threads(2)
    store, release, step = _blocked_writer_store(tmp_path / "c", monkeypatch, cores=2)
    assert step() == 1
    release.set()
    for future, _ in store._writes:  # done (flush() would put the number back itself)
        future.exception(timeout=30)
    assert step() == 2  # back at the first step that finds the writer done
    store.finish()


def test_a_core_is_spared_only_when_training_fills_them_and_never_when_told_not_to(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    for cores, settings, inside in [(4, {}, 2), (2, {"spare_core": False}, 2)]:
        store, release, step = _blocked_writer_store(tmp_path / f"{cores}", monkeypatch, cores, **settings)
        assert step() == inside
        release.set()
        store.finish()
    torch.set_num_threads(1)  # one thread: nothing to spare
    store, release, step = _blocked_writer_store(tmp_path / "one", monkeypatch, cores=1)
    assert step() == 1
    release.set()
    store.finish()


def test_a_step_the_store_skips_spares_the_core_as_a_wrapped_one(tmp_path, monkeypatch):
    """The Trainer callback counts the steps outside windows with skip_step(), which lowers and puts
    back the threads as step() does; inside a window it is refused."""
    torch.set_num_threads(2)
    store, release, _ = _blocked_writer_store(tmp_path, monkeypatch, cores=2)
    store.skip_step()
    assert torch.get_num_threads() == 1
    release.set()
    for future, _ in store._writes:
        future.exception(timeout=30)
    store.skip_step()
    assert torch.get_num_threads() == 2 and store.steps == 6
    store.finish()
    model, task, data = _problem("mlp")
    projector = KroneckerProjector(k_in=2, k_out=2, basis="random")
    opening = TrainingStore(
        model, task, data, tmp_path / "b", TrainingStoreSettings(checkpoints=(0,), projector=projector)
    )
    with pytest.raises(IndexStoreError, match=r"store\.step\(\)"):
        opening.skip_step()


def test_a_step_that_raises_while_a_core_is_spared_puts_the_threads_back(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    store, release, _ = _blocked_writer_store(tmp_path, monkeypatch, cores=2)
    with pytest.raises(RuntimeError, match="diverged"), store.step(torch.arange(BATCH), lr=0.5):
        assert torch.get_num_threads() == 1
        raise RuntimeError("diverged")
    assert torch.get_num_threads() == 2
    release.set()
    store.finish()


def test_the_store_covers_the_parameters_of_the_default_influence(tmp_path):
    """Past the exact estimator's size the default covers the Linear/Conv layers only (here not the
    LayerNorm); the store chooses them without the default's look at the data, the same ones."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 64), nn.Linear(64, 3)
    )
    x, y = torch.randn(N, 20), torch.randint(0, 3, (N,))
    task = ClassificationTask()
    projector = KroneckerProjector(k_in=4, k_out=4, basis="random")
    store = TrainingStore(
        model, task, (x, y), tmp_path, TrainingStoreSettings(checkpoints=(0,), projector=projector)
    )
    for ids in torch.arange(N).split(BATCH):
        with store.step(ids, lr=0.1):
            task.loss(model, (x[ids], y[ids])).mean().backward()
    inf = Influence(model, task, (x, y))
    assert "1.weight" not in inf.fn.names
    assert GradientIndex.open(store.finish()[0], inf).header["fingerprint"]["params"] == list(inf.fn.names)


def test_settings_are_validated():
    k = KroneckerProjector(k_in=2, k_out=2)
    for bad in [(), (3, 1), (-1,), (1, 1), (1.5,)]:
        with pytest.raises(ConfigError, match="checkpoints"):
            TrainingStoreSettings(checkpoints=bad, projector=k)
    with pytest.raises(ConfigError, match="KroneckerProjector"):
        TrainingStoreSettings(checkpoints=(0,), projector=GaussianProjector(k=8))
    for bad in ["avg", 0, -2.0, True]:
        with pytest.raises(ConfigError, match="loss_scale"):
            TrainingStoreSettings(checkpoints=(0,), projector=k, loss_scale=bad)
    with pytest.raises(ConfigError, match="fisher"):
        TrainingStoreSettings(checkpoints=(0,), projector=k, fisher="diag")
    for bad in [-1.0, float("inf"), float("nan"), True, "32"]:
        with pytest.raises(ConfigError, match="hold_mb"):
            TrainingStoreSettings(checkpoints=(0,), projector=k, hold_mb=bad)
    for bad in [1, "yes", None]:
        with pytest.raises(ConfigError, match="spare_core"):
            TrainingStoreSettings(checkpoints=(0,), projector=k, spare_core=bad)
    assert TrainingStoreSettings(checkpoints=[0, 5], projector=k).checkpoints == (0, 5)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_hugging_face_trainer_writes_the_post_hoc_store(tmp_path, bf16):
    """The Trainer's steps, in float32 or in mixed precision (``bf16=True``: accelerate wraps the
    model's forward in autocast; the first batch's check and the PCA basis run the model's own)."""
    transformers = pytest.importorskip("transformers")
    from influencer.index.trainer import IndexedDataset, store_callback
    from influencer.tasks.huggingface import CausalLMTask

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    n, t = 32, 16
    tokens = torch.randint(0, 64, (n, t))
    data = {
        "input_ids": tokens,
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "labels": tokens.clone(),
    }
    rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
    task = CausalLMTask()
    params = [
        name for name, _ in model.named_parameters() if any(s in name for s in ("c_attn", "c_proj", "c_fc"))
    ]
    projector = KroneckerProjector(k_in=4, k_out=4, basis="pca" if bf16 else "random", pca_examples=16)
    store = TrainingStore(
        model,
        task,
        data,
        tmp_path / "train",
        TrainingStoreSettings(checkpoints=(0, 4), projector=projector),
        params=params,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=0.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        bf16=bf16,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=IndexedDataset(rows), callbacks=[store_callback(store)]
    )
    trainer.train()
    if bf16:  # accelerate wrapped the model's forward in autocast: the post-hoc store runs its own
        model.forward = model._original_forward
    inf = Influence(model, task, data, params=params)
    post = GradientIndex.build(inf, tmp_path / "post", projector).gradients()
    for step in (0, 4):
        ours = GradientIndex.open(tmp_path / "train" / f"step-{step:08d}", inf).gradients()
        # the Trainer runs the model's own attention mask and kernel: float32 rounding apart (or,
        # with bf16, bfloat16's)
        err = float((ours - post).norm() / post.norm())
        assert (1e-6 < err < 5e-2) if bf16 else err < 1e-5
    stores = CheckpointStores.open(tmp_path / "train", model, task, data, params=params)
    assert stores.lrs == [0.0, 0.0]


def test_a_window_with_a_non_finite_gradient_is_refused_when_it_closes(tmp_path):
    """Non-finite rows are found when the window closes (one check per window, in the writer thread,
    not per step), and raised by the next step, flush() or finish(), naming the examples; nothing is
    written for that window, and it is not listed as written."""
    from influencer.errors import NonFiniteError

    model, task, (x, y) = _problem("mlp")
    x = x.clone()
    x[37, 2] = float("inf")  # one example's gradient is not finite; the others are
    settings = TrainingStoreSettings(
        checkpoints=(0, 2 * N // BATCH),
        projector=KroneckerProjector(k_in=4, k_out=3, basis="random"),
        check=False,
    )
    store = TrainingStore(model, task, (x, y), tmp_path / "train", settings)
    order = torch.arange(N)

    def epoch() -> None:
        for ids in order.split(BATCH):
            with store.step(ids, lr=0.1):
                task.loss(model, (x[ids], y[ids])).mean().backward()
            model.zero_grad()

    epoch()  # the window of step 0 closes at the epoch's last step
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[37\] in the window of step 0"):
        store.flush()
    assert store.written == [] and not (tmp_path / "train" / "step-00000000" / "manifest.json").exists()
    epoch()  # steps 4-7, no window: the error was raised once
    epoch()  # the window of step 8
    store._writer.submit(lambda: None).result()  # (one writer thread: its check is done)
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[37\] in the window of step 8"):
        epoch()  # raised by the first step after the check
    assert store.steps == 12 and store.written == []
    store.finish()
