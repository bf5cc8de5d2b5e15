"""Symmetric rank-k updates by blocks on and above the diagonal (``influencer._kernel.gram``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from influencer._kernel.gram import ALIGN, add_upper_gram, gram, mirror_upper, pieces


@pytest.mark.parametrize("d", [1, 10, 160, 289, 513, 769, 1500])
def test_pieces_cover_the_columns_on_aligned_inner_edges(d):
    edges = pieces(d)
    assert edges[0] == 0 and edges[-1] == d
    assert all(a < b for a, b in itertools.pairwise(edges))
    assert all(e % ALIGN == 0 for e in edges[1:-1])
    assert len(edges) > 2 or d < 300  # wide matrices are cut, else nothing is saved


@pytest.mark.parametrize("d", [7, 289, 769])
def test_accumulated_upper_blocks_mirrored_equal_the_full_gram(d):
    gen = torch.Generator().manual_seed(d)
    x, y = (
        torch.randn(50, d, generator=gen, dtype=torch.float64),
        torch.randn(30, d, generator=gen, dtype=torch.float64),
    )
    out = torch.zeros(d, d, dtype=torch.float64)
    add_upper_gram(out, x)
    add_upper_gram(out, y, alpha=0.25)
    if len(pieces(d)) > 2:  # only the blocks on and above the diagonal were written
        assert float(out[-1, 0]) == 0.0
    want = x.T @ x + 0.25 * y.T @ y
    torch.testing.assert_close(mirror_upper(out), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram(x), x.T @ x, rtol=1e-12, atol=1e-12)
    cut = pieces(d)[1]  # the blocks off the diagonal are exact mirrors
    assert torch.equal(out[cut:, :cut], out[:cut, cut:].T)
