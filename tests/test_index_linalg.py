"""The store build's dense kernels against torch's full products and eigendecompositions."""

import pytest
import torch

from influencer._kernel.gram import gram
from influencer.index.linalg import top_eigenvectors

F64 = torch.float64


@pytest.mark.parametrize("d", [7, 400, 577])
def test_gram_is_the_full_product(d):
    x = torch.randn(50, d, dtype=F64, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(gram(x), x.T @ x, rtol=1e-12, atol=1e-12)


def covariance(d: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))).Q
    return q @ torch.diag(spectrum) @ q.T


def test_top_eigenvectors_span_the_leading_subspace_of_eigh():
    """With a decaying spectrum (as activations' and gradients' covariances have) the subspace
    iteration finds eigh's leading eigenvectors, each to its sign-fixed vector."""
    d, k = 120, 6
    m = covariance(d, 0.7 ** torch.arange(d, dtype=F64), seed=1)
    got = top_eigenvectors(m, k, seed=0)
    vectors = torch.linalg.eigh(m).eigenvectors[:, -k:].flip(1).T
    torch.testing.assert_close(got.T @ got, vectors.T @ vectors, rtol=0, atol=1e-8)
    torch.testing.assert_close(got @ got.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.abs(), vectors.abs(), rtol=0, atol=1e-6)
    assert bool((got.gather(1, got.abs().argmax(1, keepdim=True)) > 0).all())  # signs fixed
    assert torch.equal(top_eigenvectors(m, k, seed=0), got)  # reproducible
    assert got.is_contiguous()


def test_top_eigenvectors_keep_the_energy_of_a_flat_spectrum():
    """Where the spectrum is flat around k the leading subspace is ill-defined; the vectors found
    still carry nearly the energy of the top k eigenvectors (98% here, on a spectrum falling by
    only 1.7% from the first to the 10th value)."""
    d, k = 300, 10
    m = covariance(d, torch.linspace(1.0, 0.5, d, dtype=F64), seed=2)
    got = top_eigenvectors(m, k, seed=0)
    best = torch.linalg.eigvalsh(m)[-k:].sum()
    assert float(torch.trace(got @ m @ got.T) / best) > 0.97


def test_small_matrices_use_eigh():
    m = covariance(8, torch.arange(8, 0, -1, dtype=F64), seed=3)
    got = top_eigenvectors(m, 2)
    vectors = torch.linalg.eigh(m).eigenvectors[:, -2:].flip(1).T
    torch.testing.assert_close(got.abs(), vectors.abs(), rtol=0, atol=1e-12)
