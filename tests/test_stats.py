"""Correlation statistics against SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from influencer._kernel.stats import pearson, ranks, spearman


def test_pearson_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[::7] = y[0]  # ties
    assert pearson(x, y) == pytest.approx(sp.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(sp.spearmanr(x, y).statistic, abs=1e-12)


def test_ranks_average_ties():
    assert ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_constant_input_has_no_correlation_and_bad_lengths_fail():
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least two"):
        spearman([1], [1])
