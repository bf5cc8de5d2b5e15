"""The same influence on CUDA as on the CPU (runs where a GPU exists)."""

from __future__ import annotations

import pytest
import torch

from influencer import CG, EKFAC, Arnoldi, Exact, Influence, LiSSA
from influencer.uses.validation import leave_one_out

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ("cpu", "cuda")  # the reference first


@cuda
@pytest.mark.parametrize(
    "estimator",
    [
        Exact(),
        CG(tol=1e-10),
        LiSSA(depth=100, batch_size=50, damping=0.01),
        Arnoldi(rank=40, iterations=80),
        EKFAC(),
    ],
    ids=lambda e: e.name if hasattr(e, "name") else str(e),
)
def test_cuda_scores_equal_cpu_scores(digits_small, logistic_small, estimator):
    model, task = logistic_small
    test = (digits_small.x_test[:4], digits_small.y_test[:4])
    cpu = Influence(model, task, digits_small.train, estimator=estimator).fit().scores(test)
    gpu = Influence(model, task, digits_small.train, estimator=estimator, device="cuda").fit().scores(test)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-12)


@cuda
def test_cuda_self_influence_and_leave_one_out(digits_small, logistic_small):
    model, task = logistic_small
    inf = Influence(model, task, digits_small.train, estimator=Exact(), device="cuda").fit()
    cpu = Influence(model, task, digits_small.train, estimator=Exact()).fit()
    torch.testing.assert_close(inf.self_influence().cpu(), cpu.self_influence(), rtol=1e-8, atol=1e-14)
    result = leave_one_out(inf, (digits_small.x_test[:1], digits_small.y_test[:1]), k=10)
    assert result.pearson > 0.95


@cuda
@pytest.mark.parametrize("low", [None, torch.bfloat16], ids=["full", "bfloat16"])
def test_cuda_store_queries_equal_cpu_queries(digits_small, mlp_small, tmp_path, low):
    """A Kronecker store built and queried on CUDA (each chunk read, checked and moved to the
    device in the reader thread) scores as the CPU's does; with bfloat16 Fisher and score
    products, to their precision."""
    from influencer.index import GradientIndex, KroneckerProjector, ProjectedFisher

    model, task = mlp_small
    test = (digits_small.x_test[:6], digits_small.y_test[:6])
    projector = KroneckerProjector(k_in=8, k_out=6, basis="random", dtype="float64")
    scores = {}
    for device in DEVICES:
        inf = Influence(model, task, digits_small.train, device=device)
        index = GradientIndex.build(inf, tmp_path / device, projector, chunk=70, fisher_dtype=low)
        scores[device] = index.scores(test, preconditioner=ProjectedFisher(), score_dtype=low)
    assert scores[DEVICES[1]].device.type == DEVICES[1]
    scale = float(scores["cpu"].abs().max())
    tol = {"rtol": 1e-6, "atol": 1e-12 * scale} if low is None else {"rtol": 0.0, "atol": 0.03 * scale}
    torch.testing.assert_close(scores[DEVICES[1]].cpu(), scores["cpu"], **tol)
