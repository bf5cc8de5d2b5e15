"""Defaults a user meets first: the default estimator on a network's indefinite Hessian fails with
an error that names a one-line fix that works."""

from __future__ import annotations

import re

import pytest
import torch

from influencer import CG, Influence
from influencer.errors import IndefiniteHessianError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_estimator_names_the_fix_for_an_indefinite_hessian(mlp_small, digits_small):
    model, task = mlp_small
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    inf = Influence(model, task, train)
    h = inf.curvature_product(torch.eye(inf.p, dtype=torch.float64))  # dense (p, p), p = 910
    lowest = float(torch.linalg.eigvalsh(0.5 * (h + h.T))[0])
    assert lowest < 0  # the MLP trained with Adam has an indefinite Hessian
    with pytest.raises(IndefiniteHessianError, match="the default estimator, CG") as refused:
        inf.fit().scores(test)
    message = str(refused.value)
    assert "indefinite" in message and "curvature='gauss_newton'" in message
    damping = float(re.search(r"estimator=CG\(damping=([0-9.e+-]+)\)", message).group(1))
    assert damping > -lowest
    fixed = Influence(model, task, train, estimator=CG(damping=damping)).fit().scores(test)
    assert torch.isfinite(fixed).all()
    psd = Influence(model, task, train, curvature="gauss_newton", estimator=CG(damping=1e-3))
    assert torch.isfinite(psd.fit().scores(test)).all()
    # A chosen estimator keeps its own error: the user already picked its settings.
    with pytest.raises(IndefiniteHessianError, match="CG met negative curvature"):
        Influence(model, task, train, estimator=CG()).fit().scores(test)
    with pytest.raises(IndefiniteHessianError, match="the default estimator"):
        inf.replace(dtype=torch.float64).fit().scores(test)  # still the default after replace()
