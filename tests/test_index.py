"""The gradient index: exact against Influence with k = p, streaming top-k against dense top-k,
a crash-safe, resumable, fingerprinted store, and checkpointed queries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from influencer import Exact, Identity, Influence, top_k
from influencer.errors import ConfigError, DataError, IndefiniteHessianError, NonFiniteError
from influencer.index import (
    EstimatorPreconditioner,
    GaussianProjector,
    GradientIndex,
    IdentityProjector,
    IndexStoreError,
    KroneckerProjector,
    NoPreconditioner,
    ProjectedFisher,
    Projection,
    Projector,
    QueryResult,
)
from influencer.index.topk import RunningTopK, merge_ranked, prune

F64 = torch.float64
DAMPING = 1e-3


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def problem(digits_small, mlp_small):
    """The tanh MLP (p = 910) on 300 digits, 20 test digits, float64."""
    model, task = mlp_small
    inf = Influence(model, task, digits_small.train, estimator=Identity(), batch_size=64)
    return inf, digits_small.test


@pytest.fixture(scope="module")
def exact_store(problem, tmp_path_factory):
    inf, _ = problem
    return GradientIndex.build(
        inf, tmp_path_factory.mktemp("exact"), IdentityProjector(dtype="float64"), chunk=70
    )


def empirical_fisher_scores(inf: Influence, test) -> torch.Tensor:
    """Dense reference: (1/n) grad f^T (G^T G / n + damping I)^-1 G^T."""
    g = torch.cat([x for _, x in inf.train_gradients()])  # (n, p)
    fisher = g.T @ g / inf.n + DAMPING * torch.eye(inf.p, dtype=F64)
    return inf.gradients(test) @ torch.linalg.solve(fisher, g.T) / inf.n


def stable_top_k(scores: torch.Tensor, k: int):
    """Reference top-k with ties broken by the smaller id (stable sorts of the full rows)."""
    helpful = torch.sort(scores, dim=1, descending=True, stable=True)
    harmful = torch.sort(scores, dim=1, descending=False, stable=True)
    return helpful.indices[:, :k], helpful.values[:, :k], harmful.indices[:, :k], harmful.values[:, :k]


# ---- exact with k = p ---------------------------------------------------------------------------


def test_identity_projection_gives_influence_scores(problem, exact_store):
    inf, test = problem
    reference = inf.fit().scores(test)
    got = exact_store.scores(test, preconditioner=NoPreconditioner(), block=7)
    assert float((got - reference).abs().max()) <= 1e-8 * float(reference.abs().max())
    # self-influence subtracts the regulariser's gradient from the stored objective gradients
    torch.testing.assert_close(
        exact_store.self_influence(preconditioner=NoPreconditioner()), inf.self_influence(), rtol=1e-8, atol=0
    )
    cols = [5, 299, 0, 71]
    torch.testing.assert_close(
        exact_store.scores(test, cols, NoPreconditioner()), reference[:, cols], rtol=1e-10, atol=0
    )


def test_estimator_before_projection_gives_exact_gauss_newton_scores(problem, exact_store):
    inf, test = problem
    exact = inf.replace(estimator=Exact(damping=DAMPING), curvature="gauss_newton").fit()
    index = GradientIndex.open(
        exact_store.path, exact
    )  # same gradients: the curvature is not in the fingerprint
    reference = exact.scores(test)
    got = index.scores(test, preconditioner=EstimatorPreconditioner())
    assert float((got - reference).abs().max()) <= 1e-8 * float(reference.abs().max())


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrthogonalProjector(Projector):
    """A random rotation of the whole parameter space (k = p): projected-space curvature must
    give the same scores as the unprojected one."""

    kind = "test-orthogonal"

    def bind(self, fn):
        return _Rotation(fn.p)


class _Rotation(Projection):
    def __init__(self, p: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))[0]
        self.k = self.p = p
        self.info = {"k": p}

    def project(self, grads):
        return grads @ self.q.T


@pytest.mark.parametrize(
    "projector", [IdentityProjector(dtype="float64"), OrthogonalProjector(dtype="float64")]
)
def test_projected_fisher_with_k_equal_p_is_the_exact_empirical_fisher(problem, tmp_path, projector):
    inf, test = problem
    index = GradientIndex.build(inf, tmp_path, projector, chunk=128)
    reference = empirical_fisher_scores(inf, test)
    got = index.scores(test, preconditioner=ProjectedFisher(damping=DAMPING, relative_damping=0))
    assert float((got - reference).abs().max()) <= 1e-8 * float(reference.abs().max())


def test_kronecker_store_holds_projected_gradients(problem, tmp_path):
    inf, test = problem
    projector = KroneckerProjector(k_in=8, k_out=4, dtype="float64")
    index = GradientIndex.build(inf, tmp_path, projector, chunk=64, fisher="full")
    g = torch.cat([x for _, x in inf.train_gradients()])
    expected = index.projection.project(g)
    torch.testing.assert_close(index.gradients(), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    torch.testing.assert_close(index.gradients([299, 3]), expected[[299, 3]], rtol=0, atol=1e-12)
    fisher = expected.T @ expected / inf.n
    torch.testing.assert_close(index.fisher(), fisher, rtol=1e-10, atol=1e-14)
    # the default build keeps only the layers' diagonal blocks of the Fisher: the layer-wise
    # preconditioner scores the same, and the whole-matrix one is refused with the fix
    blockwise = GradientIndex.build(inf, tmp_path / "layers", projector, chunk=64)
    assert (blockwise.fisher_kind, index.fisher_kind) == ("layers", "full")
    mask = torch.zeros_like(fisher, dtype=torch.bool)
    for _, a, b in index.projection.blocks:
        mask[a:b, a:b] = True
    torch.testing.assert_close(blockwise.fisher(), torch.where(mask, fisher, 0.0), rtol=1e-10, atol=1e-14)
    assert not bool(mask.all())
    torch.testing.assert_close(
        blockwise.scores(test, preconditioner=ProjectedFisher()),
        index.scores(test, preconditioner=ProjectedFisher()),
        rtol=1e-9,
        atol=0,
    )
    with pytest.raises(ConfigError, match=r"only the per-layer blocks.*fisher='full'"):
        blockwise.scores(test, preconditioner=ProjectedFisher(blocks="full"))
    # scores are projected gradient dot products with the library's sign and 1/n
    projected_test = index.projection.project(inf.gradients(test))
    got = index.scores(test, preconditioner=NoPreconditioner())
    want = projected_test @ expected.T / inf.n
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # the projected Fisher: whole, or block-diagonal over the layers, each block damped by its own scale
    full = fisher + 0.3 * fisher.trace() / index.k * torch.eye(index.k, dtype=F64)
    layers = torch.zeros_like(fisher)
    assert [name for name, _, _ in index.projection.blocks] == ["0", "2"]
    for _, a, b in index.projection.blocks:
        block = fisher[a:b, a:b]
        layers[a:b, a:b] = block + (1e-4 + 0.3 * block.trace() / (b - a)) * torch.eye(b - a, dtype=F64)
    for blocks, matrix, damping in (("full", full, 0.0), ("layers", layers, 1e-4)):
        pre = ProjectedFisher(damping=damping, relative_damping=0.3, blocks=blocks)
        want = torch.linalg.solve(matrix, projected_test.T).T @ expected.T / inf.n
        got = index.scores(test, preconditioner=pre)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


# ---- streaming top-k ----------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "block"), [(5, 2), (7, 3), (64, 20), (330, 50)])
def test_streaming_top_k_equals_dense_top_k(problem, tmp_path, chunk, block):
    inf, test = problem
    # duplicated training examples score exactly alike: ties must come out in id order
    x, y = inf.train.tree
    dup = torch.tensor([3, 3, 10, 250, 10, 41] * 5)
    tied = inf.replace(train=(torch.cat([x, x[dup]]), torch.cat([y, y[dup]])))
    index = GradientIndex.build(tied, tmp_path, GaussianProjector(k=64, dtype="float64"), chunk=chunk)
    pre = ProjectedFisher(relative_damping=0.05)
    dense = index.scores(test, preconditioner=pre, block=block)  # (20, 330), the same arithmetic
    for k in (1, 12):
        got = index.top_k(test, k, block=block, preconditioner=pre)
        hi, hv, bi, bv = stable_top_k(dense, k)
        assert torch.equal(got.helpful_ids, hi) and torch.equal(got.harmful_ids, bi)
        assert torch.equal(got.helpful_scores, hv) and torch.equal(got.harmful_scores, bv)
        plain = top_k(dense, k)  # the library's dense top-k agrees on the values
        assert torch.equal(got.helpful_scores, plain.helpful_scores)
        assert torch.equal(got.harmful_scores, plain.harmful_scores)
    all_ = index.top_k(test, 10_000, block=block, preconditioner=pre)  # k is capped at n
    assert all_.helpful_ids.shape == (20, 330)
    assert torch.equal(all_.helpful_ids.sort(1).values, torch.arange(330).expand(20, -1))


# ---- the store on disk --------------------------------------------------------------------------


class StopBuildError(Exception):
    pass


def stop_after(count: int):
    seen = []

    def callback(j: int) -> None:
        seen.append(j)
        if len(seen) == count:
            raise StopBuildError

    return callback


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_build_resumes_to_the_same_bytes(problem, tmp_path):
    inf, test = problem
    projector = KroneckerProjector(k_in=6, k_out=5, seed=3)  # float32 storage
    whole = GradientIndex.build(inf, tmp_path / "whole", projector, chunk=40)
    with pytest.raises(StopBuildError):
        GradientIndex.build(inf, tmp_path / "resumed", projector, chunk=40, on_chunk=stop_after(3))
    with pytest.raises(IndexStoreError, match=r"unfinished \(3 of 8 chunks\).*resume it"):
        GradientIndex.open(tmp_path / "resumed", inf)
    recomputed = []
    resumed = GradientIndex.build(inf, tmp_path / "resumed", projector, chunk=40, on_chunk=recomputed.append)
    assert recomputed == [3, 4, 5, 6, 7]
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "resumed")
    assert not list((tmp_path / "resumed" / "chunks").glob("*.json"))  # records merged into the manifest
    # a complete store is reused as it is
    again = []
    GradientIndex.build(inf, tmp_path / "resumed", projector, chunk=40, on_chunk=again.append)
    assert again == []
    torch.testing.assert_close(resumed.top_k(test, 5).helpful_scores, whole.top_k(test, 5).helpful_scores)
    # a damaged chunk is refused on open and recomputed (alone) by build
    (tmp_path / "resumed" / "chunks" / "000002.npy").write_bytes(b"garbage")
    with pytest.raises(IndexStoreError, match=r"chunk 2 .* missing or damaged"):
        GradientIndex.open(tmp_path / "resumed", inf)
    redone = []
    GradientIndex.build(inf, tmp_path / "resumed", projector, chunk=40, on_chunk=redone.append)
    assert redone == [2]
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "resumed")
    GradientIndex.open(tmp_path / "resumed", inf, verify=True)
    # the PCA basis is stored: a damaged one is refused on open, and build re-estimates it and
    # recomputes every chunk (they were projected with the lost basis)
    assert projector.basis == "pca" and (tmp_path / "resumed" / "basis.npy").exists()
    (tmp_path / "resumed" / "basis.npy").write_bytes(b"garbage")
    with pytest.raises(IndexStoreError, match=r"projection basis .* \(basis\.npy\) is missing or damaged"):
        GradientIndex.open(tmp_path / "resumed", inf)
    rebuilt = []
    GradientIndex.build(inf, tmp_path / "resumed", projector, chunk=40, on_chunk=rebuilt.append)
    assert rebuilt == list(range(8))
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "resumed")


def test_changed_inputs_are_refused_with_what_changed(problem, tmp_path):
    inf, _ = problem
    projector = GaussianProjector(k=16)
    GradientIndex.build(inf, tmp_path, projector, chunk=100)
    moved = inf.replace(theta=inf.theta + 1e-3)
    with pytest.raises(
        IndexStoreError, match=r"another model, data or task \(model\.state\).*overwrite=True"
    ):
        GradientIndex.open(tmp_path, moved)
    with pytest.raises(IndexStoreError, match=r"other inputs \(.*projector\.k 16 -> 32.*\).*overwrite=True"):
        GradientIndex.build(inf, tmp_path, GaussianProjector(k=32), chunk=100)
    with pytest.raises(IndexStoreError, match=r"chunk 100 -> 50"):
        GradientIndex.build(inf, tmp_path, projector, chunk=50)
    with pytest.raises(IndexStoreError, match=r"another projector \(seed 0 -> 1\)"):
        GradientIndex.open(tmp_path, inf, projector=GaussianProjector(k=16, seed=1))
    rebuilt = GradientIndex.build(moved, tmp_path, projector, chunk=100, overwrite=True)
    assert GradientIndex.open(tmp_path, moved).fingerprint == rebuilt.fingerprint


def test_a_kronecker_store_whose_whole_sides_were_random_factors_is_refused(problem, tmp_path):
    """A store from settings without ``whole_sides`` projected its square sides by random factors:
    opened with the identity ones it would be misread, so it is refused, naming the setting."""
    inf, _ = problem
    GradientIndex.build(inf, tmp_path, KroneckerProjector(k_in=4, k_out=64, basis="random"), chunk=100)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["header"]["projector"]["whole_sides"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match=r"another projector \(whole_sides .*identity"):
        GradientIndex.open(tmp_path, inf)


def test_store_directory_errors(problem, tmp_path):
    inf, _ = problem
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(
        IndexStoreError, match=r"cannot write the index directory .*choose a writable directory"
    ):
        GradientIndex.build(inf, blocker / "index", GaussianProjector(k=4))
    with pytest.raises(IndexStoreError, match=r"exists and is not a directory"):
        GradientIndex.build(inf, blocker, GaussianProjector(k=4))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(IndexStoreError, match=r"not empty and holds no manifest.json.*notes.txt"):
        GradientIndex.build(inf, foreign, GaussianProjector(k=4))
    with pytest.raises(IndexStoreError, match=r"holds no gradient index.*GradientIndex.build"):
        GradientIndex.open(tmp_path / "nothing", inf)
    with pytest.raises(ConfigError, match=r"chunk must be a positive integer"):
        GradientIndex.build(inf, tmp_path / "x", GaussianProjector(k=4), chunk=0)
    # nothing is pickled: every array loads with allow_pickle=False
    GradientIndex.build(inf, tmp_path / "ok", GaussianProjector(k=4), chunk=128)
    for path in (tmp_path / "ok").rglob("*.npy"):
        np.load(path, allow_pickle=False)


def test_bad_queries_and_inputs_are_refused(problem, exact_store, tmp_path):
    inf, test = problem
    with pytest.raises(DataError, match=r"do not match the training data"):
        exact_store.top_k(torch.zeros(3, 5, dtype=F64), 2)
    with pytest.raises(ConfigError, match=r"k must be a positive integer"):
        exact_store.top_k(test, 0)
    with pytest.raises(ConfigError, match=r"block must be a positive integer"):
        exact_store.top_k(test, 3, block=0)
    with pytest.raises(ConfigError, match=r"blocks must be 'layers' or 'full'"):
        ProjectedFisher(blocks="diagonal")
    # k = p = 910 > n = 300: the empirical Fisher is singular without damping
    with pytest.raises(IndefiniteHessianError, match=r"projected Fisher \(k=910, n=300\).*relative_damping"):
        exact_store.scores(test, preconditioner=ProjectedFisher(relative_damping=0))
    with pytest.raises(ConfigError, match=r"call fit\(\)"):
        GradientIndex.open(exact_store.path, inf.replace()).scores(
            test, preconditioner=EstimatorPreconditioner()
        )
    bare = GradientIndex.build(inf, tmp_path / "bare", GaussianProjector(k=8), fisher=False)
    with pytest.raises(ConfigError, match=r"built with fisher=False.*NoPreconditioner"):
        bare.top_k(test, 3)
    with pytest.raises(ConfigError, match=r"fisher must be 'layers', 'full', True or False, got 'diag'"):
        GradientIndex.build(inf, tmp_path / "bad", GaussianProjector(k=8), fisher="diag")
    with pytest.raises(ConfigError, match=r"no projected-space form"):
        bare.self_influence(preconditioner=EstimatorPreconditioner())
    x, y = inf.train.tree
    broken = x.clone()
    broken[[4, 9, 150]] = float("nan")
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[4, 9\]"):
        GradientIndex.build(
            inf.replace(train=(broken, y)), tmp_path / "nan", GaussianProjector(k=8), chunk=100
        )
    with pytest.raises(NonFiniteError, match=r"measurement gradient .* example\(s\) \[1\]"):
        bare.top_k((broken[149:152], y[149:152]), 3, preconditioner=NoPreconditioner())


# ---- checkpointed queries -----------------------------------------------------------------------


def test_interrupted_query_resumes_from_its_checkpoint(problem, tmp_path, capsys):
    inf, test = problem
    index = GradientIndex.build(inf, tmp_path / "index", GaussianProjector(k=32), chunk=50, progress=True)
    pre = ProjectedFisher(relative_damping=0.1)
    whole = index.top_k(test, 6, block=3, preconditioner=pre)
    ckpt = tmp_path / "query"
    with pytest.raises(StopBuildError):
        index.top_k(test, 6, block=3, preconditioner=pre, checkpoint=ckpt, on_block=stop_after(4))
    partial = QueryResult.open(ckpt)
    assert partial.done == [0, 1, 2, 3] and not partial.complete
    with pytest.raises(IndexStoreError, match=r"finished 4 of 7 test blocks"):
        partial.top_k()
    redone = []
    got = index.top_k(
        test, 6, block=3, preconditioner=pre, checkpoint=ckpt, on_block=redone.append, progress=True
    )
    assert redone == [4, 5, 6]
    stored = QueryResult.open(ckpt).top_k()
    for field in ("helpful_ids", "helpful_scores", "harmful_ids", "harmful_scores"):
        assert torch.equal(getattr(got, field), getattr(whole, field))
        assert torch.equal(getattr(stored, field), getattr(whole, field))
    with pytest.raises(IndexStoreError, match=r"results of another query \(.*k 6 -> 4.*overwrite=True"):
        index.top_k(test, 4, block=3, preconditioner=pre, checkpoint=ckpt)
    with pytest.raises(IndexStoreError, match=r"preconditioner.relative_damping 0.1 -> 0.2"):
        index.top_k(test, 6, block=3, preconditioner=ProjectedFisher(relative_damping=0.2), checkpoint=ckpt)
    other = index.top_k(test, 4, block=3, preconditioner=pre, checkpoint=ckpt, overwrite=True)
    assert torch.equal(other.helpful_ids, whole.helpful_ids[:, :4])
    assert "index: top-k" in capsys.readouterr().err


@pytest.mark.parametrize("ties", [True, "some rows", False])
def test_running_top_k_breaks_ties_by_id_for_any_blocking(ties):
    gen = torch.Generator().manual_seed(0)
    if ties is True:  # many exact ties, also at blocks' k-th values (every tied column is kept then)
        scores = torch.randint(-3, 4, (5, 40), generator=gen).double()
    elif ties:  # rows with ties beside rows without: candidates packed per row, padded
        scores = torch.randn(5, 40, generator=gen, dtype=F64)
        scores[1::2] = torch.randint(-3, 4, (2, 40), generator=gen).double()
    else:  # each block's own top k is selected without sorting it
        scores = torch.randn(5, 40, generator=gen, dtype=F64)
    hi, hv, bi, bv = stable_top_k(scores, 9)
    for width in (1, 3, 7, 20, 40):
        running = RunningTopK(5, 9, F64, "cpu")
        for start in range(0, 40, width):
            running.add(scores[:, start : start + width], torch.arange(start, min(start + width, 40)))
        got = running.result()
        assert torch.equal(got.helpful_ids, hi) and torch.equal(got.helpful_scores, hv)
        assert torch.equal(got.harmful_ids, bi) and torch.equal(got.harmful_scores, bv)
        # merging the lists of consecutive id ranges (as ranks do) gives the same
        parts = []
        for start in range(0, 40, 13):
            part = RunningTopK(5, 9, F64, "cpu")
            part.add(scores[:, start : start + 13], torch.arange(start, min(start + 13, 40)))
            parts.append(part.result())
        merged = merge_ranked(parts, 9)
        assert torch.equal(merged.helpful_ids, hi) and torch.equal(merged.harmful_ids, bi)


@pytest.mark.parametrize("ties", [True, False])
def test_running_top_k_over_pruned_blocks_equals_a_stable_sort(ties):
    """Once a list is full, a block's runs of columns that cannot beat its k-th value are skipped;
    the lists stay those of a stable sort of the whole row, ties included."""
    gen = torch.Generator().manual_seed(3)
    if ties:  # each value about 50 times a row: the lists are the first ids of the extreme values
        scores = torch.randint(-40, 41, (6, 4000), generator=gen).double()
    else:
        scores = torch.randn(6, 4000, generator=gen, dtype=F64)
    hi, hv, bi, bv = stable_top_k(scores, 7)
    running = RunningTopK(6, 7, F64, "cpu", group=8)
    pruned = 0
    for start in range(0, 4000, 800):
        block = scores[:, start : start + 800]
        for largest, (values, _) in ((True, running.helpful), (False, running.harmful)):
            if values.shape[1] == 7:
                pruned += prune(block, values[:, -1], largest, 8) is not None
        running.add(block, torch.arange(start, start + 800))
    assert pruned == 8  # every block after the first, both lists
    got = running.result()
    assert torch.equal(got.helpful_ids, hi) and torch.equal(got.helpful_scores, hv)
    assert torch.equal(got.harmful_ids, bi) and torch.equal(got.harmful_scores, bv)


def test_pruning_rows_with_fewer_runs_than_others_adds_no_column_twice():
    """Row 0 beats its bound in four runs of the block, row 1 in its first run only: row 1's three
    padding slots must not bring that run's columns again."""
    first = torch.zeros(2, 8, dtype=F64)
    first[:, :2] = 1.0  # the helpful lists' 2nd value, the bound: 1.0
    block = torch.full((2, 64), 0.5, dtype=F64)
    block[0, [0, 4, 8, 12]] = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=F64)  # runs 0-3 of 4 columns
    block[1, 1] = 2.0  # run 0
    running = RunningTopK(2, 2, F64, "cpu", group=4)
    running.add(first, torch.arange(8))
    assert prune(block, running.helpful[0][:, -1], True, 4) is not None
    running.add(block, torch.arange(8, 72))
    hi, hv, _, _ = stable_top_k(torch.cat([first, block], 1), 2)
    got = running.result()
    assert got.helpful_ids.tolist() == hi.tolist() == [[20, 16], [9, 0]]
    assert torch.equal(got.helpful_scores, hv)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_pruned_block_with_a_non_finite_score_is_refused(bad):
    scores = torch.randn(4, 2000, generator=torch.Generator().manual_seed(1), dtype=F64)
    scores[2, 1717] = bad
    running = RunningTopK(4, 5, F64, "cpu", group=10)
    running.add(scores[:, :1000], torch.arange(1000))
    for largest, (values, _) in ((True, running.helpful), (False, running.harmful)):
        assert prune(scores[:, 1000:], values[:, -1], largest, 10) is not None
    with pytest.raises(NonFiniteError, match=r"1 of 4000 scores .*\(2, 1717\)"):
        running.add(scores[:, 1000:], torch.arange(1000, 2000))


def test_half_precision_storage(problem, tmp_path):
    inf, test = problem
    full = GradientIndex.build(inf, tmp_path / "64", GaussianProjector(k=48, dtype="float64"), chunk=128)
    half = GradientIndex.build(inf, tmp_path / "16", GaussianProjector(k=48, dtype="float16"), chunk=128)
    assert torch.equal(half.gradients(), full.gradients().half().double())  # rounded once, when stored
    assert (tmp_path / "16" / "chunks" / "000000.npy").stat().st_size < 0.3 * (
        tmp_path / "64" / "chunks" / "000000.npy"
    ).stat().st_size
    a, b = half.scores(test), full.scores(test)
    assert float((a - b).abs().max()) < 1e-2 * float(b.abs().max())


# ---- damaged stores -----------------------------------------------------------------------------


def _flip_bytes(path: Path) -> None:
    """32 bytes inverted in the data part of a .npy file: same size, valid header."""
    data = bytearray(path.read_bytes())
    data[-64:-32] = bytes(b ^ 0xFF for b in data[-64:-32])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def _nan_with_its_checksum(path: Path) -> None:
    """A NaN written into the chunk and its sha256 recorded, as a damaged build could have done."""
    import hashlib
    import json

    rows = np.load(path, allow_pickle=False)
    rows[3, 1] = np.nan
    np.save(path, rows, allow_pickle=False)
    manifest_path = path.parent.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["chunks"][2]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_bytes, r"chunk 2 of the index .* is damaged: its sha256 differs"),
        (_truncate, r"chunk 2 .* (missing or damaged|is damaged)"),
        (_nan_with_its_checksum, r"chunk 2 .* holds NaN or infinite values for training id\(s\) \[143\]"),
    ],
)
def test_a_damaged_chunk_is_refused_by_every_reader(problem, tmp_path, damage, message):
    inf, test = problem
    projector = GaussianProjector(k=8, seed=1)
    intact = GradientIndex.build(inf, tmp_path, projector, chunk=70)
    before = intact.top_k(test, 3)
    damage(tmp_path / "chunks" / "000002.npy")
    readers = {
        "top_k": lambda index: index.top_k(test, 3),
        "scores": lambda index: index.scores(test[:2]),
        "gradients": lambda index: index.gradients([141, 150]),
        "self_influence": lambda index: index.self_influence(),
    }
    for name, read in readers.items():
        with pytest.raises(IndexStoreError, match=message):
            read(GradientIndex.open(tmp_path, inf))
        if name == "top_k" and damage is not _truncate:  # unverified, the damage is read as data
            with pytest.raises((AssertionError, NonFiniteError)):
                torch.testing.assert_close(
                    GradientIndex.open(tmp_path, inf, verify=False).top_k(test, 3).helpful_scores,
                    before.helpful_scores,
                )
    # a build recomputes the damaged chunk alone
    redone = []
    rebuilt = GradientIndex.build(inf, tmp_path, projector, chunk=70, on_chunk=redone.append)
    assert redone == [2]
    torch.testing.assert_close(rebuilt.top_k(test, 3).helpful_scores, before.helpful_scores)


def test_damaged_fisher_file_is_refused(problem, tmp_path):
    inf, test = problem
    GradientIndex.build(inf, tmp_path, GaussianProjector(k=8, seed=1), chunk=70)
    _flip_bytes(tmp_path / "fisher.npy")
    with pytest.raises(IndexStoreError, match=r"fisher\.npy is damaged: its sha256 differs"):
        GradientIndex.open(tmp_path, inf).top_k(test, 3)


def test_resuming_a_build_removes_the_temporary_files_of_the_interrupted_one(problem, tmp_path):
    inf, _ = problem
    projector = GaussianProjector(k=8, seed=1)
    with pytest.raises(StopBuildError):
        GradientIndex.build(inf, tmp_path, projector, chunk=70, on_chunk=stop_after(2))
    stale = [tmp_path / "chunks" / ".000002.npy.abc123.tmp", tmp_path / ".manifest.json.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"half a chunk")
    GradientIndex.build(inf, tmp_path, projector, chunk=70)
    assert not any(path.exists() for path in stale)
    assert not list(tmp_path.rglob("*.tmp"))


def test_top_k_refuses_non_finite_scores_naming_them():
    scores = torch.tensor([[0.1, float("nan"), -0.2, 0.3], [0.0, 0.5, float("inf"), 0.1]])
    with pytest.raises(NonFiniteError, match=r"2 of 8 scores are NaN or infinite .*\(0, 1\), \(1, 2\)"):
        top_k(scores, 2)
    with pytest.raises(NonFiniteError, match=r"\(0, 11\)"):  # named by training id
        top_k(scores, 2, ids=torch.tensor([10, 11, 12, 13]))
    running = RunningTopK(2, 2, scores.dtype, "cpu")
    with pytest.raises(NonFiniteError, match=r"training id: \(0, 21\)"):
        running.add(scores, torch.tensor([20, 21, 22, 23]))
    assert top_k(scores.nan_to_num(0.0, 0.0, 0.0), 1).helpful_ids.tolist() == [[3], [1]]


def test_a_damaged_query_checkpoint_block_is_recomputed(problem, tmp_path):
    inf, test = problem
    index = GradientIndex.build(inf, tmp_path / "index", GaussianProjector(k=8, seed=1), chunk=70)
    whole = index.top_k(test, 3, block=5, checkpoint=tmp_path / "query")
    scores = sorted((tmp_path / "query").rglob("*.npy"))
    assert scores
    for path in scores:
        if "scores" in path.name:
            _flip_bytes(path)
    redone = []
    again = index.top_k(test, 3, block=5, checkpoint=tmp_path / "query", on_block=redone.append)
    assert redone == [0, 1, 2, 3]  # every block's scores file was changed on disk: none is served
    torch.testing.assert_close(again.helpful_scores, whole.helpful_scores)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_running_top_k_refuses_a_non_finite_score_naming_it(bad):
    scores = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=F64)
    scores[2, 17] = bad
    running = RunningTopK(4, 5, F64, "cpu")
    running.add(scores[:, :10], torch.arange(10))
    with pytest.raises(NonFiniteError, match=r"1 of 80 scores .*\(2, 17\)"):
        running.add(scores[:, 10:], torch.arange(10, 30))


def test_bfloat16_score_products_are_the_rounded_products_ranked_as_always(problem, exact_store):
    """``score_dtype=torch.bfloat16``: directions and rows rounded to bfloat16 and multiplied there;
    the lists are those of exactly these scores (ties by id), close to the full-precision ones."""
    _, test = problem
    pre = NoPreconditioner()
    full = exact_store.scores(test, preconditioner=pre)
    low = exact_store.scores(test, preconditioner=pre, score_dtype=torch.bfloat16, block=7)
    d = exact_store.test_gradients(test)
    rows = exact_store.gradients(torch.arange(exact_store.n))
    expected = (d.bfloat16() @ rows.bfloat16().T).to(F64) / exact_store.n
    assert torch.equal(low, expected) and low.dtype == F64
    assert float((low - full).abs().max()) <= 0.02 * float(full.abs().max())
    top = exact_store.top_k(test, 5, preconditioner=pre, score_dtype=torch.bfloat16)
    hi, hv, bi, bv = stable_top_k(expected, 5)
    assert torch.equal(top.helpful_ids, hi) and torch.equal(top.helpful_scores, hv)
    assert torch.equal(top.harmful_ids, bi) and torch.equal(top.harmful_scores, bv)
    with pytest.raises(ConfigError, match="score_dtype must be a floating torch dtype"):
        exact_store.top_k(test, 5, score_dtype="bfloat16")


def test_bfloat16_fisher_products_are_the_rounded_blocks_summed_in_float64(problem, tmp_path):
    """``fisher_dtype=torch.bfloat16``: each chunk's rows rounded to bfloat16, their layer-block
    products summed in float64, close to the full-precision Fisher; recorded in the header, so a
    store built otherwise is not taken for it."""
    inf, _ = problem
    projector = KroneckerProjector(k_in=8, k_out=6, basis="random", dtype="float64")
    full = GradientIndex.build(inf, tmp_path / "full", projector, chunk=70)
    low = GradientIndex.build(inf, tmp_path / "low", projector, chunk=70, fisher_dtype=torch.bfloat16)
    assert low.header["fisher_dtype"] == "bfloat16" and "fisher_dtype" not in full.header
    rows = low.gradients(torch.arange(low.n))
    assert torch.equal(rows, full.gradients(torch.arange(full.n)))  # the gradients are not rounded
    expected = torch.zeros(low.k, low.k, dtype=F64)
    for _, a, b in low.projection.blocks:
        for start in range(0, low.n, 70):
            part = rows[start : start + 70, a:b].bfloat16()
            expected[a:b, a:b] += (part.T @ part).double()
    assert torch.allclose(low.fisher(), expected / low.n, rtol=0, atol=1e-12 * float(expected.abs().max()))
    gap = float((low.fisher() - full.fisher()).norm() / full.fisher().norm())
    assert 0 < gap < 1e-2
    with pytest.raises(IndexStoreError, match="fisher_dtype"):
        GradientIndex.build(inf, tmp_path / "full", projector, chunk=70, fisher_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="fisher_dtype must be a floating torch dtype"):
        GradientIndex.build(inf, tmp_path / "bad", projector, fisher_dtype="bfloat16")
    with pytest.raises(ConfigError, match="needs fisher="):
        GradientIndex.build(inf, tmp_path / "bad", projector, fisher=False, fisher_dtype=torch.bfloat16)
