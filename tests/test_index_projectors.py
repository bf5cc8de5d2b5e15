"""Random projections of gradients: the Kronecker one equals (P_out ⊗ P_in) of the explicit
per-example gradient, and every random projection preserves inner products in expectation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from influencer import ClassificationTask, Influence
from influencer.errors import ConfigError
from influencer.index import (
    GaussianProjector,
    IdentityProjector,
    KroneckerProjector,
    RademacherProjector,
)
from influencer.index import projectors as projectors_module
from influencer.index.registry import projector_from_settings
from influencer.models import MLP
from influencer.models.networks import SmallCNN

F64 = torch.float64


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


class InPlace(nn.Module):
    """A layer whose output is edited in place by the next op (ReLU(inplace=True)) and a layer
    called twice: the capture must still see the right output gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.head(torch.tanh(self.b(torch.tanh(self.b(h)))))


def kron_matrix(projection) -> torch.Tensor:
    """The dense ``(k, p)`` matrix ``blockdiag_l(P_out,l ⊗ P_in,l)`` scattered to the layers' indices."""
    m = torch.zeros(projection.k, projection.p, dtype=F64)
    for i, (layer, (p_out, p_in)) in enumerate(zip(projection.layers, projection.factors, strict=True)):
        m[projection.offsets[i] : projection.offsets[i + 1], layer.index] = torch.kron(p_out, p_in)
    return m


CASES = {
    "mlp": (lambda: MLP(8, (7,), 4), (8,), None),
    "mlp-weight-only-first-layer": (lambda: MLP(8, (7,), 4), (8,), ["0.weight", "2"]),
    "cnn": (lambda: SmallCNN(num_classes=4, channels=3), (1, 8, 8), None),
    # 20 channels: the second convolution (16 positions) projects its output gradients before the
    # sum over positions, the first (64 positions) after it
    "cnn-wide": (lambda: SmallCNN(num_classes=4, channels=20), (1, 8, 8), None),
    "in-place-and-shared": (InPlace, (6,), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kronecker_projection_equals_dense_kron_of_explicit_gradients(case):
    build, shape, params = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(11, *shape, dtype=F64)
    y = torch.randint(0, 3, (11,))
    inf = Influence(model, ClassificationTask(weight_decay=1e-2), (x, y), params=params)
    fn = inf.fn
    projection = KroneckerProjector(k_in=4, k_out=3, seed=5, basis="random", dtype="float64").bind(fn)
    dense = kron_matrix(projection)
    batch = fn.prepare((x, y))
    for kind, explicit in (
        ("loss", fn.loss_grads(inf.theta, batch)),
        ("measurement", fn.measurement_grads(inf.theta, batch)),
    ):
        expected = explicit @ dense.T  # (B, k)
        scale = float(expected.abs().max())
        for _ in range(2):  # the first call checks the layer model; later ones differentiate outputs only
            got = projection.gradients(fn, inf.theta, batch, kind)
            assert float((got - expected).abs().max()) <= 1e-10 * scale, kind
        assert float((projection.project(explicit) - expected).abs().max()) <= 1e-10 * scale
    # each layer's dims are capped at its own: the head of the MLP has d_out = 4 > k_out = 3
    assert projection.k == sum(d["k_out"] * d["k_in"] for d in projection.info["layers"])


@pytest.mark.parametrize("basis", ["random", "pca"])
def test_a_side_whose_k_reaches_its_dimension_is_kept_whole(basis):
    """k >= d on a side: its factor is the identity, so a layer with both sides whole stores its
    exact per-example gradient (the digits CNN's first convolution: 9 weights and a bias per
    channel), and the rows still equal (P_out ⊗ P_in) of the explicit gradients."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, channels=3).double()  # conv d_in 10, 28; head d_in 49; d_out 3, 3, 4
    x, y = torch.randn(30, 1, 8, 8, dtype=F64), torch.randint(0, 4, (30,))
    inf = Influence(model, ClassificationTask(weight_decay=1e-2), (x, y), batch_size=8)
    projection = KroneckerProjector(k_in=10, k_out=3, basis=basis, dtype="float64").bind(inf.fn)
    assert projection.whole == [(True, True), (True, False), (False, False)]
    projection.fit(inf)
    for (p_out, p_in), (whole_out, whole_in) in zip(projection.factors, projection.whole, strict=True):
        for factor, whole in ((p_out, whole_out), (p_in, whole_in)):
            if whole:
                assert torch.equal(factor, torch.eye(factor.shape[1], dtype=F64))
            else:
                assert factor.shape[0] < factor.shape[1]
    batch = inf.fn.prepare((x[:7], y[:7]))
    explicit = inf.fn.loss_grads(inf.theta, batch)  # (7, p)
    for _ in range(2):  # the first call checks the layer model; later ones differentiate outputs only
        got = projection.gradients(inf.fn, inf.theta, batch, "loss")
        torch.testing.assert_close(got, explicit @ kron_matrix(projection).T, rtol=1e-10, atol=1e-12)
    first = projection.layers[0]
    torch.testing.assert_close(
        got[:, : projection.offsets[1]], explicit[:, first.index], rtol=1e-10, atol=1e-12
    )
    # every side whole: nothing to fit, even for a PCA basis
    assert not KroneckerProjector(k_in=64, k_out=64, basis="pca").bind(inf.fn).needs_fit


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, 3, padding=1),
        lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2, bias=False),
        lambda: nn.Conv2d(2, 3, (3, 2), padding=(2, 1), dilation=(2, 1)),
        lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
        lambda: nn.Conv2d(2, 3, 2, padding=1, padding_mode="circular", stride=(1, 2)),
        lambda: nn.Conv2d(2, 3, 4),
    ],
)
def test_patch_rows_are_the_layer_models_activation_rows(conv):
    """The identity input side's patches, copied out of windows of the padded input, are bit for
    bit the rows ``Layer.inputs`` unfolds (padding modes, stride, dilation, no bias)."""
    from influencer._kernel.layers import find_layers
    from influencer.index.kronecker import patch_rows

    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 2, 9, 7)
    model(x)  # materialise the lazy head
    inf = Influence(model, ClassificationTask(), (x, torch.zeros(5, dtype=torch.long)))
    layer = find_layers(inf.fn)[0]
    rows = patch_rows(layer, x, 5)
    expected = layer.inputs(x, 5)
    assert rows.shape == expected.shape and torch.equal(rows, expected)


def inner_products(project, x: torch.Tensor, y: torch.Tensor, seeds: range) -> torch.Tensor:
    out = []
    for s in seeds:
        px, py = project(s, torch.stack([x, y]))
        out.append(float(px @ py))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_projected_inner_products_are_unbiased(kind):
    torch.manual_seed(1)
    model = nn.Linear(20, 15).double()  # p = 15 * 21 = 315
    inf = Influence(
        model, ClassificationTask(), (torch.randn(4, 20, dtype=F64), torch.zeros(4, dtype=torch.long))
    )
    p, k = inf.p, 12
    x = torch.randn(p, dtype=F64)
    y = 0.6 * x + torch.randn(p, dtype=F64)  # correlated, so <x, y> is far from 0
    exact = float(x @ y)

    def project(seed: int, g: torch.Tensor) -> torch.Tensor:
        if kind == "kronecker":
            projector = KroneckerProjector(k_in=4, k_out=3, seed=seed, basis="random", dtype="float64")
        else:
            cls = GaussianProjector if kind == "gaussian" else RademacherProjector
            projector = cls(k=k, seed=seed, dtype="float64")
        return projector.bind(inf.fn).project(g)

    seeds = range(400)
    est = inner_products(project, x, y, seeds)
    # The mean over S independent draws has standard error sqrt(Var / S); 5 of them bound it.
    if kind == "gaussian":
        var = (float(x @ x) * float(y @ y) + exact**2) / k
    elif kind == "rademacher":
        var = (float(x @ x) * float(y @ y) + exact**2 - 2 * float((x * x) @ (y * y))) / k
    else:
        var = float(est.var())  # no simple closed form for the Kronecker product of two draws
    if kind != "kronecker":
        # the draws really are independent and scaled by 1/sqrt(k): their spread matches theory
        assert 0.7 < float(est.var()) / var < 1.4
    assert abs(float(est.mean()) - exact) < 5 * math.sqrt(var / len(seeds))
    # and not trivially: one draw is off by far more than that bound
    assert float((est - exact).abs().max()) > 5 * math.sqrt(var / len(seeds))


def test_dense_projection_regenerated_in_blocks_equals_cached(monkeypatch):
    torch.manual_seed(0)
    inf = Influence(
        MLP(8, (7,), 4).double(),
        ClassificationTask(),
        (torch.randn(3, 8, dtype=F64), torch.zeros(3, dtype=torch.long)),
    )
    g = torch.randn(5, inf.p, dtype=F64)
    monkeypatch.setattr(projectors_module, "ROWS_PER_SEED", 16)  # p = 95: several seeded blocks
    cached = GaussianProjector(k=10, seed=3).bind(inf.fn)
    monkeypatch.setattr(projectors_module, "CACHE_BYTES", 0)
    blocked = GaussianProjector(k=10, seed=3).bind(inf.fn)
    assert cached._cached is not None and blocked._cached is None
    assert torch.equal(cached.matrix(), blocked.matrix())
    torch.testing.assert_close(blocked.project(g), cached.project(g), rtol=1e-13, atol=0)
    torch.testing.assert_close(cached.project(g), g @ cached.matrix().T, rtol=1e-13, atol=0)
    other = GaussianProjector(k=10, seed=4).bind(inf.fn)
    assert not torch.equal(other.matrix(), cached.matrix())


def test_projector_settings_round_trip_and_identity():
    for projector in (
        GaussianProjector(k=7, seed=2),
        RademacherProjector(k=3, dtype="float16"),
        KroneckerProjector(k_in=5, k_out=2, distribution="rademacher", basis="random"),
        KroneckerProjector(k_in=5, k_out=2, pca_examples=100),
        IdentityProjector(dtype="float64"),
    ):
        assert projector_from_settings(projector.settings()) == projector
    inf = Influence(
        nn.Linear(3, 2).double(),
        ClassificationTask(),
        (torch.randn(2, 3, dtype=F64), torch.zeros(2, dtype=torch.long)),
    )
    g = torch.randn(4, inf.p, dtype=F64)
    assert torch.equal(IdentityProjector().bind(inf.fn).project(g), g)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GaussianProjector(k=0), r"k must be a positive integer"),
        (lambda: RademacherProjector(k=-3), r"k must be a positive integer"),
        (lambda: KroneckerProjector(k_in=0), r"k_in must be a positive integer"),
        (lambda: KroneckerProjector(distribution="uniform"), r"'gaussian' or 'rademacher'"),
        (lambda: KroneckerProjector(basis="svd"), r"basis must be 'random' or 'pca', got 'svd'"),
        (lambda: KroneckerProjector(pca_examples=0), r"pca_examples must be a positive integer"),
        (lambda: GaussianProjector(dtype="bfloat16"), r"dtype must be one of"),
        (lambda: projector_from_settings({"kind": "sketchy"}), r"unknown projector kind 'sketchy'"),
    ],
)
def test_invalid_projector_settings(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_projector_errors_against_the_model():
    inf = Influence(
        nn.Linear(3, 2).double(),
        ClassificationTask(),
        (torch.randn(2, 3, dtype=F64), torch.zeros(2, dtype=torch.long)),
    )
    with pytest.raises(
        ConfigError, match=r"k=9 exceeds the number of chosen parameters p=8.*IdentityProjector"
    ):
        GaussianProjector(k=9).bind(inf.fn)

    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.emb(x))

    inf = Influence(
        WithEmbedding().double(), ClassificationTask(), (torch.tensor([1, 2]), torch.tensor([0, 1]))
    )
    with pytest.raises(
        ConfigError, match=r"KroneckerProjector: .*emb.weight.*GaussianProjector works for any"
    ):
        KroneckerProjector().bind(inf.fn)


def test_pca_basis_is_the_top_eigenvectors_of_the_kfac_factors():
    """basis='pca': each layer's P_in / P_out rows span the leading eigenvectors of the empirical
    K-FAC factors A and S (computed here by the K-FAC estimator's own sweep), orthonormal, and the
    projected gradients equal (P_out ⊗ P_in) of the explicit gradients."""
    from influencer import KFAC

    torch.manual_seed(0)
    model = MLP(8, (7,), 4).double()
    x, y = torch.randn(60, 8, dtype=F64), torch.randint(0, 4, (60,))
    inf = Influence(model, ClassificationTask(weight_decay=1e-2), (x, y), batch_size=16)
    projection = KroneckerProjector(k_in=3, k_out=2, dtype="float64").bind(inf.fn)
    with pytest.raises(ConfigError, match=r"basis='pca'\) has no basis yet.*basis='random'"):
        projection.project(torch.zeros(1, inf.p, dtype=F64))
    projection.fit(inf)
    kfac = inf.replace(estimator=KFAC(fisher="empirical", damping=1e-3)).fit()
    for (p_out, p_in), (a, s) in zip(projection.factors, kfac.solver.factors, strict=True):
        for basis, factor in ((p_in, a), (p_out, s)):
            k = basis.shape[0]
            values, vectors = torch.linalg.eigh(factor)
            assert float(values[-k] - values[-k - 1]) > 1e-3 * float(values[-1])  # a clear gap at k
            top = vectors[:, -k:]
            torch.testing.assert_close(basis @ basis.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
            torch.testing.assert_close(basis.T @ basis, top @ top.T, rtol=0, atol=1e-9)
            assert bool((basis.gather(1, basis.abs().argmax(1, keepdim=True)) > 0).all())  # signs fixed
    explicit = inf.fn.loss_grads(inf.theta, inf.fn.prepare((x[:5], y[:5])))
    got = projection.gradients(inf.fn, inf.theta, inf.fn.prepare((x[:5], y[:5])), "loss")
    torch.testing.assert_close(got, explicit @ kron_matrix(projection).T, rtol=1e-10, atol=1e-12)
    # a basis restored from its stored state is the same; a subset of examples gives another one
    again = KroneckerProjector(k_in=3, k_out=2, dtype="float64").bind(inf.fn)
    again.load_state(projection.state())
    assert torch.equal(again.state(), projection.state())
    assert [tuple(f.shape) for pair in again.factors for f in pair] == [(2, 7), (3, 9), (2, 4), (3, 8)]
    subset = KroneckerProjector(k_in=3, k_out=2, pca_examples=20, dtype="float64").bind(inf.fn)
    subset.fit(inf)
    twice = KroneckerProjector(k_in=3, k_out=2, pca_examples=20, dtype="float64").bind(inf.fn)
    twice.fit(inf)
    assert torch.equal(subset.state(), twice.state())
    assert not torch.allclose(subset.state(), projection.state())


@pytest.mark.parametrize("path", ["gradients", "pca fit"])
def test_a_batch_s_autograd_graph_is_freed_once_its_rows_are_formed(path):
    """The captures hold each layer's output for the backward pass, and each output's tensor hook
    holds the capture: a cycle through autograd's C++ graph, which Python's collector cannot see.
    Left in place, every batch's graph (its saved activations, the parameters' copy) stayed alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = MLP(8, (7,), 4).double()
    x, y = torch.randn(40, 8, dtype=F64), torch.randint(0, 4, (40,))
    inf = Influence(model, ClassificationTask(), (x, y), batch_size=20)
    basis = "random" if path == "gradients" else "pca"
    projector = KroneckerProjector(k_in=3, k_out=2, basis=basis, pca_examples=20, dtype="float64")
    projection = projector.bind(inf.fn)
    outputs: list[weakref.ref] = []
    handle = model[0].register_forward_hook(lambda m, i, out: outputs.append(weakref.ref(out)))
    try:
        for _ in range(2):  # the first batch also checks the layer model (another branch)
            if path == "gradients":
                projection.gradients(inf.fn, inf.theta, (x[:20], y[:20]), "loss")
            else:
                projection.fit(inf)
    finally:
        handle.remove()
    gc.collect()
    assert outputs and all(ref() is None for ref in outputs)
