"""K-FAC and EK-FAC: exact where the curvature factorises, checked factor by factor elsewhere.

Oracles: the dense Hessian (a linear least-squares model, where K-FAC is exact), the closed-form
Gauss-Newton matrix of multinomial logistic regression, the dense Gauss-Newton matrix of small
networks (``Curvature.dense``), and factors rebuilt independently with ``torch.func`` Jacobians.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from influencer import ClassificationTask, Exact, Influence
from influencer._kernel.curvature import Curvature
from influencer._kernel.functional import ModelFunction
from influencer._kernel.stats import pearson
from influencer.data import as_examples
from influencer.datasets import load_digits, load_tabular
from influencer.errors import ConfigError, IndefiniteHessianError, NonFiniteError
from influencer.estimators import kronecker
from influencer.estimators.ekfac import EKFAC, corrected_eigenvalues
from influencer.estimators.kfac import KFAC
from influencer.estimators.kronecker import covariance_factors, eigenbasis, find_layers
from influencer.tasks import RegressionTask, Task
from influencer.training import train_minibatch

F64 = torch.float64


@functools.cache
def digits(images: bool = False):
    return load_digits(images=images, dtype=F64)


def curvature_of(model, task, train, params=None, batch_size=512) -> Curvature:
    fn = ModelFunction(model, task, params, dtype=F64)
    return Curvature(fn, fn.theta0, as_examples(train), kind="gauss_newton", batch_size=batch_size)


def kronecker_basis(solver, i: int = 0) -> torch.Tensor:
    q_s, q_a = solver.bases[i]
    return torch.kron(q_s, q_a)  # eigenvectors in the layer's row-major [W | b] layout


# ---- (1) exact where the Gauss-Newton is a Kronecker product ------------------------------------


@pytest.mark.parametrize("estimator", [KFAC(fisher="exact"), EKFAC(fisher="exact")], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_exact_for_linear_least_squares(estimator, outputs):
    # A linear model with squared error: Hessian = (1/n) sum x x^T ⊗ I + wd I = S ⊗ A + wd I exactly.
    d = load_tabular("wine", dtype=F64)
    x, y = d.x_train[:, 3:], d.x_train[:, :outputs]
    test = (d.x_test[:, 3:], d.x_test[:, :outputs])
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], outputs).double()
    task = RegressionTask(weight_decay=1e-2)
    # Train to the optimum: ridge regression in closed form, (X~^T X~ / n + wd I) [W | b]^T = X~^T y / n.
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], dim=1)
    gram = xt.T @ xt / len(x) + 1e-2 * torch.eye(xt.shape[1], dtype=F64)
    coef = torch.linalg.solve(gram, xt.T @ y / len(x))  # (d + 1, outputs)
    with torch.no_grad():
        model.weight.copy_(coef[:-1].T)
        model.bias.copy_(coef[-1])
    exact = Influence(model, task, (x, y), estimator=Exact()).fit()
    kron = Influence(model, task, (x, y), estimator=estimator, hessian_batch_size=37).fit()
    ref = exact.scores(test)
    got = kron.scores(test)
    assert float((got - ref).abs().max()) <= 1e-8 * float(ref.abs().max())
    assert torch.allclose(kron.self_influence(), exact.self_influence(), rtol=1e-8, atol=0)
    assert kron.solver.info["regularizer_curvature"] == pytest.approx([1e-2], rel=1e-12)
    h = exact.curvature.dense()
    assert torch.allclose(kron.solver.dense(), h, rtol=0, atol=1e-10 * float(h.abs().max()))


# ---- (2) EK-FAC's eigenvalue correction on multinomial logistic regression ----------------------


@pytest.fixture(scope="module")
def logistic():
    d = digits()
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    task = ClassificationTask(weight_decay=1e-3)
    train_minibatch(model, task, d.train, epochs=15, lr=1e-2, batch_size=64, seed=0)
    return model, task


def logistic_gauss_newton(model, x) -> torch.Tensor:
    """Closed form ``(1/n) sum_i (diag p_i - p_i p_i^T) ⊗ x~_i x~_i^T`` in ``[W | b]`` layout."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, 10, 10)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (n, 65)
    g = torch.einsum("noq,ni,nj->oiqj", h, xt, xt) / len(x)
    return g.reshape(650, 650)


def test_ekfac_corrects_kfac_eigenvalues_on_digits(logistic, monkeypatch):
    model, task = logistic
    d = digits()
    wd = task.weight_decay
    kfac = Influence(model, task, d.train, estimator=KFAC(fisher="exact")).fit()
    ekfac = Influence(model, task, d.train, estimator=EKFAC(fisher="exact")).fit()
    layer = kfac.solver.layers[0]
    g = logistic_gauss_newton(model, d.x_train)  # (650, 650), [W | b] layout
    q = kronecker_basis(ekfac.solver)
    # EK-FAC's eigenvalues are exactly the Gauss-Newton's diagonal in the Kronecker eigenbasis.
    lam = ekfac.solver.values[0] - wd
    assert torch.allclose(lam.reshape(-1), torch.diagonal(q.T @ g @ q), rtol=1e-9, atol=1e-12)
    # dense() maps the blocks back to theta's layout (weight then bias).
    perm = torch.argsort(layer.index)
    g_theta = g[perm][:, perm] + wd * torch.eye(650, dtype=F64)
    err_k = float((kfac.solver.dense() - g_theta).norm() / g_theta.norm())
    err_e = float((ekfac.solver.dense() - g_theta).norm() / g_theta.norm())
    assert err_e <= err_k  # measured: 0.319 (EK-FAC) vs 0.324 (K-FAC)
    assert err_e < 0.4

    # Influence against the exact (closed-form) Gauss-Newton inverse.
    test = (d.x_test[:40], d.y_test[:40])
    grads = kfac.gradients(test)  # (40, 650)
    ref_dirs = torch.linalg.solve(g_theta, grads.T).T
    ref = kfac.scores_from_directions(ref_dirs)
    r_k = pearson(kfac.scores(test), ref)
    r_e = pearson(ekfac.scores(test), ref)
    assert r_e >= r_k - 1e-3  # measured: 0.873 (EK-FAC) vs 0.872 (K-FAC)
    assert r_k > 0.75

    # solve() inverts exactly the matrix dense() describes, damping included.
    solver = EKFAC(damping=1e-2).fit(kfac.curvature)
    v = torch.randn(3, 650, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.solve(solver.dense() + 1e-2 * torch.eye(650, dtype=F64), v.T).T
    assert torch.allclose(solver.solve(v), expected, rtol=1e-9, atol=1e-12)
    # in chunks of rows (two rows per chunk here), the same answer
    monkeypatch.setattr(kronecker, "_SOLVE_ELEMENTS", 2 * 650)
    assert torch.allclose(solver.solve(v), expected, rtol=1e-9, atol=1e-12)


def test_sampled_fisher_is_unbiased_and_empirical_differs(logistic):
    model, task = logistic
    d = digits()
    curv = curvature_of(model, task, d.train)
    layers = find_layers(curv.fn)
    (a, s), *_ = covariance_factors(curv, layers, "exact")
    (a2, s_sampled), *_ = covariance_factors(curv, layers, "sampled", samples=20, seed=3)
    (_, s_emp), *_ = covariance_factors(curv, layers, "empirical")
    assert torch.allclose(a2, a, rtol=1e-12, atol=1e-14)  # activations do not depend on the directions
    rel = float((s_sampled - s).norm() / s.norm())
    assert 1e-4 < rel < 0.05  # noisy but unbiased; a wrong 1/samples would be off by 20x
    # The empirical Fisher uses the observed labels: a different (biased) matrix.
    assert float((s_emp - s).norm() / s.norm()) > 0.05


def test_singular_curvature_needs_damping():
    d = digits()
    model = nn.Linear(64, 10).double()
    # Cross-entropy is invariant to shifting all logits: S is singular without weight decay.
    task = ClassificationTask()
    curv = curvature_of(model, task, d.train)
    with pytest.raises(IndefiniteHessianError, match="damping"):
        KFAC().fit(curv)
    solver = KFAC(relative_damping=0.1).fit(curv)
    assert torch.isfinite(solver.solve(torch.ones(1, curv.p, dtype=F64))).all()


# ---- (3) a small MLP: agreement with the exact Gauss-Newton inverse -----------------------------


def test_mlp_influence_correlates_with_exact_gauss_newton():
    d = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    task = ClassificationTask(weight_decay=1e-3)
    train_minibatch(model, task, d.train, epochs=15, lr=1e-2, batch_size=64, seed=0)
    sub = torch.arange(0, len(d.x_train), 3)  # the curvature on 449 examples keeps Exact quick
    test = (d.x_test[:20], d.y_test[:20])
    kw = {"curvature": "gauss_newton", "hessian_indices": sub}
    exact = Influence(model, task, d.train, estimator=Exact(), **kw).fit()
    g, grads = exact.solver.hessian, exact.gradients(test)  # (p, p) incl. weight decay, (20, p)
    eye = torch.eye(len(g), dtype=F64)
    # Measured Pearson r (K-FAC, EK-FAC): damping 0.1 -> 0.958, 0.956; 0.01 -> 0.832, 0.822.
    # (Undamped, with only the 1e-3 weight decay: 0.69, 0.67; the exact block-diagonal gets 0.98,
    # so the Kronecker factorisation, not the neglect of cross-layer terms, limits it.)
    for damping, floor in ((0.1, 0.9), (0.01, 0.7)):
        ref = exact.scores_from_directions(torch.linalg.solve(g + damping * eye, grads.T).T)
        for est in (KFAC(damping=damping), EKFAC(damping=damping)):
            inf = Influence(model, task, d.train, estimator=est, **kw).fit()
            r = pearson(inf.scores(test), ref)
            assert r > floor, (est.name, damping, r)


# ---- (4) convolutions and sequences: factors against an explicit computation -------------------


class Tokens(nn.Module):
    """A linear layer shared over 16 "tokens" of 4 pixels, then a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(4, 3)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x.reshape(len(x), 16, 4))).flatten(1))


CONVS = {
    "stride2": dict(kernel_size=3, padding=1, stride=2),
    "same-reflect": dict(kernel_size=2, padding="same", padding_mode="reflect"),
}


def conv_net(kind: str) -> nn.Module:
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 3, **CONVS[kind])
    width = 3 * (16 if kind == "stride2" else 64)
    return nn.Sequential(conv, nn.Softplus(), nn.Flatten(), nn.Linear(width, 10)).double()


@pytest.mark.parametrize("kind", [*CONVS, "tokens"])
def test_shared_layer_factors_match_explicit_computation(kind):
    d = digits(images=kind != "tokens")
    x, y = d.x_train[:300], d.y_train[:300]
    model = Tokens().double() if kind == "tokens" else conv_net(kind)
    first, rest = (model.tok, None) if kind == "tokens" else (model[0], model[1:])
    name = "tok" if kind == "tokens" else "0"
    curv = curvature_of(model, ClassificationTask(), (x, y), params=[name], batch_size=128)
    layers = find_layers(curv.fn)
    ((a, s),) = covariance_factors(curv, layers)

    # Patches without unfold: the layer is linear in its weight, so running it with a one-hot
    # weight (zero bias) reads off one patch coordinate at every position.
    inputs = x.reshape(-1, 16, 4) if kind == "tokens" else x
    fan_in = first.weight[0].numel()
    cols = []
    for j in range(fan_in):
        w = torch.zeros_like(first.weight)
        w[0].view(-1)[j] = 1.0
        with torch.no_grad():
            state = {"weight": w, "bias": torch.zeros_like(first.bias)}
            out = torch.func.functional_call(first, state, inputs)
        cols.append(out[..., 0] if kind == "tokens" else out[:, 0].flatten(1))  # (n, T)
    patches = torch.stack(cols, dim=2)  # (n, T, fan_in)
    with torch.no_grad():
        pre = first(inputs)  # the layer's output
    g_of = (lambda s_: model.head(torch.tanh(s_).flatten(1))) if kind == "tokens" else rest
    rows = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=F64)], dim=2)
    a_ref = torch.einsum("nti,ntj->ij", rows, rows) / (rows.shape[0] * rows.shape[1])

    # S = (1/n) sum_i sum_t J_it^T H_i J_it: per-example Jacobians of the logits w.r.t. the layer output.
    jac = vmap(jacrev(lambda s1: g_of(s1[None])[0]))(pre)  # (n, 10, *layer output)
    jac = jac.reshape(len(x), 10, 3, -1) if kind != "tokens" else jac.permute(0, 1, 3, 2)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    s_ref = torch.einsum("nqot,nqr,nrut->ou", jac, h, jac) / len(x)
    assert torch.allclose(a, a_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-14)

    # EK-FAC: the exact layer block's diagonal in the eigenbasis, cross-position terms included.
    bases = [(eigenbasis(s)[1], eigenbasis(a)[1])]
    (lam,) = corrected_eigenvalues(curv, layers, bases)
    idx = layers[0].index
    g = curv.dense()[idx][:, idx]  # exact Gauss-Newton block in [W | b] layout
    q = torch.kron(*bases[0])
    assert torch.allclose(lam.reshape(-1), torch.diagonal(q.T @ g @ q), rtol=1e-9, atol=1e-13)


class Twice(nn.Module):
    """One layer applied twice (and registered under two names): weight sharing across calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 6)
        self.shared = nn.Linear(6, 6)
        self.alias = self.shared
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(self.alias(torch.tanh(self.shared(h)))))


def test_layer_called_twice_and_bias_only_blocks():
    d = digits()
    data = (d.x_train[:200], d.y_train[:200])
    torch.manual_seed(0)
    model = Twice().double()
    # Both calls are positions of one Kronecker block; EK-FAC still gets the exact diagonal.
    curv = curvature_of(model, ClassificationTask(), data, params=["shared"], batch_size=64)
    solver = EKFAC(damping=1e-3, fisher="exact").fit(curv)
    q = kronecker_basis(solver)
    idx = solver.layers[0].index
    g = curv.dense()[idx][:, idx]
    assert torch.allclose(solver.values[0].reshape(-1), torch.diagonal(q.T @ g @ q), rtol=1e-9, atol=1e-13)
    # A bias alone is a layer with one input (the constant 1): its block S is exact.
    curv = curvature_of(model, ClassificationTask(), data, params=["head.bias", "inp.bias"])
    solver = KFAC(damping=1e-6, fisher="exact").fit(curv)
    exact = curv.dense()
    blocks = torch.block_diag(*(exact[lay.index][:, lay.index] for lay in solver.layers))
    perm = torch.argsort(torch.cat([lay.index for lay in solver.layers]))
    assert torch.allclose(solver.dense(), blocks[perm][:, perm], rtol=1e-10, atol=1e-14)


# ---- (4b) scores solved in layer form -------------------------------------------------------------


def test_kfac_inverse_eigenvalues_have_a_low_rank_factorisation():
    """K-FAC's inverse damped eigenvalues 1 / (s_j a_k + damping) of a 128 x 129 layer: about 20
    terms reproduce them to float64 rounding, however wide the layer."""
    d = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    curv = curvature_of(model.double(), ClassificationTask(weight_decay=1e-3), (d.x_train, d.y_train))
    solver = KFAC(damping=1e-3).fit(curv)
    inverse = 1 / solver.damped[1]  # (128, 129)
    u, w = kronecker._low_rank(inverse)
    assert u.shape[1] < 40
    err = float((u @ w.T - inverse).abs().max() / inverse.abs().max())
    assert err < 1e-13, err


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_scores_solved_in_layer_form_equal_the_dense_solve(estimator, dtype):
    """Influence.scores solves the test gradients' layer rows (K-FAC: a few rank-one terms per wide
    layer, dense blocks elsewhere) and gives the scores of the dense (m, p) directions."""
    d = digits()
    x, y = d.x_train[:300].to(dtype), d.y_train[:300]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    est = KFAC(damping=1e-3) if estimator == "kfac" else EKFAC(damping=1e-3)
    inf = Influence(
        model.to(dtype), ClassificationTask(weight_decay=1e-3), (x, y), estimator=est, batch_size=64
    )
    inf = inf.fit()
    test = (d.x_test[:9].to(dtype), d.y_test[:9])
    solved = inf.solver.solve_rows(inf._test_rows(test))
    kinds = ["dense" if solved.dense_block(i) is not None else "rows" for i in range(3)]
    # the head (10 outputs) is too narrow to gain; EK-FAC's fitted eigenvalues have no low rank
    # at float64 precision (at float32's, some layers may)
    if estimator == "kfac":
        assert kinds == ["rows", "rows", "dense"]
    elif dtype == F64:
        assert kinds == ["dense"] * 3
    if estimator == "kfac":
        assert solved.acts[1][0].shape[1] < 40  # terms per test example in the 128 x 129 layer
    got = inf.scores(test)
    want = inf.scores_from_directions(inf.test_directions(test))
    tol = 1e-12 if dtype == F64 else 2e-5
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())
    assert float(want.abs().max()) > 0


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_self_influence_in_layer_form_equals_the_solve_of_each_gradient(estimator, model):
    """Kronecker self-influence from layer rows (a quadratic form in the eigenbasis, plus the
    regulariser's term through one solve) equals solving every per-example gradient; a
    non-finite example is still named."""
    d = digits(images=model == "cnn")
    x, y = d.x_train[:200], d.y_train[:200]
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
        if model == "mlp"
        else nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10))
    ).double()
    est = KFAC(damping=1e-3) if estimator == "kfac" else EKFAC(damping=1e-3)
    inf = Influence(net, ClassificationTask(weight_decay=1e-2), (x, y), estimator=est, batch_size=64).fit()
    got = inf.self_influence([3, 150, 7, 199])
    want = inf._self_influence_from_gradients([3, 150, 7, 199])
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    assert bool((want > 0).all())
    bad = x.clone()
    bad[150, 0] = float("nan")
    broken = Influence(net, ClassificationTask(weight_decay=1e-2), (bad, y), estimator=est, batch_size=64)
    broken = broken.replace(estimator=est, hessian_indices=list(range(100))).fit()
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[150\]"):
        broken.self_influence([3, 150])


# ---- (5) what K-FAC cannot model: clear errors --------------------------------------------------


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


class Tied(nn.Module):
    """The first layer's weight is reused functionally: the layer model does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + F.linear(x, self.fc.weight))


def test_unsupported_parameters_raise_clear_errors():
    d = digits()
    task = ClassificationTask(weight_decay=1e-3)
    data = (d.x_train[:64], d.y_train[:64])
    model = Normed().double()
    with pytest.raises(ConfigError, match=r"norm\.weight, norm\.bias.*params=\[\.\.\.\].*'fc', 'head'"):
        Influence(model, task, data, estimator=KFAC()).fit()
    Influence(model, task, data, estimator=KFAC(), params=["fc", "head"]).fit()  # the fix works

    with pytest.raises(ConfigError, match=r"'fc'.*outside the module's forward"):
        Influence(Tied().double(), task, data, estimator=EKFAC()).fit()

    shared = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)).double()
    shared[2].weight = shared[0].weight
    with pytest.raises(ConfigError, match="shared"):
        Influence(shared, task, (torch.randn(8, 10, dtype=F64), torch.arange(8)), estimator=KFAC()).fit()

    class OwnLoss(Task):
        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    lin = nn.Linear(64, 10).double()
    with pytest.raises(ConfigError, match="fisher='empirical'"):
        Influence(lin, OwnLoss(), data, estimator=KFAC(damping=1e-3)).fit()
    Influence(lin, OwnLoss(), data, estimator=KFAC(damping=1e-3, fisher="empirical")).fit()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fisher": "true"},
        {"samples": 0},
        {"relative_damping": -1.0},
        {"damping": float("nan")},
        {"seed": 1.5},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ConfigError):
        KFAC(**kwargs)


def test_non_isotropic_regularizer_warns():
    class WeightsOnly(ClassificationTask):
        def regularizer(self, params):
            return 0.5 * 1e-2 * sum((p * p).sum() for n, p in params.items() if n.endswith("weight"))

    d = digits()
    with pytest.warns(RuntimeWarning, match="not a multiple of the identity"):
        Influence(nn.Linear(64, 10).double(), WeightsOnly(), d.train, estimator=KFAC(damping=1e-3)).fit()


# ---- (6) chunking invariance --------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_factors_do_not_depend_on_chunking(fisher):
    d = digits(images=True)
    model = conv_net("stride2")
    task = ClassificationTask()
    data = (d.x_train[:100], d.y_train[:100])
    out = []
    for bs in (13, 100):
        curv = curvature_of(model, task, data, batch_size=bs)
        layers = find_layers(curv.fn)
        factors = covariance_factors(curv, layers, fisher)
        bases = [(eigenbasis(s)[1], eigenbasis(a)[1]) for a, s in factors]
        out.append((factors, corrected_eigenvalues(curv, layers, bases, fisher)))
    (f1, l1), (f2, l2) = out
    for (a1, s1), (a2, s2), x1, x2 in zip(f1, f2, l1, l2, strict=True):
        assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-15)
        assert torch.allclose(s1, s2, rtol=1e-12, atol=1e-15)
        assert torch.allclose(x1, x2, rtol=1e-9, atol=1e-15)


def test_in_place_activation_after_a_layer_is_handled():
    d = digits()
    data = (d.x_train[:100], d.y_train[:100])
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    inplace = nn.Sequential(nn.Linear(64, 8), nn.ReLU(inplace=True), nn.Linear(8, 10)).double()
    inplace.load_state_dict(plain.state_dict())
    factors = []
    for model in (plain, inplace):
        curv = curvature_of(model, ClassificationTask(), data)
        factors.append(covariance_factors(curv, find_layers(curv.fn)))
    for (a1, s1), (a2, s2) in zip(*factors, strict=True):
        assert torch.equal(a1, a2) and torch.equal(s1, s2)
