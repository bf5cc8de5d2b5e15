"""EK-FAC: K-FAC's eigenbasis with refitted eigenvalues (George et al. 2018; Grosse et al. 2023).

K-FAC's eigenvalues ``d_S d_A^T`` assume activations and output gradients are independent.
EK-FAC keeps the Kronecker eigenbasis ``Q_S ⊗ Q_A`` but replaces them by the second moments of the
per-example gradients projected onto it,

    Lambda = (1/m) sum_i E_dir[(Q_S^T DW_i Q_A)^2]    (d_out, d_in),   DW_i = sum_t g_it a_it^T,

which is the diagonal of the layer's exact Gauss-Newton block in that basis: the best
approximation in Frobenius norm with these eigenvectors, never worse than K-FAC's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError
from influencer.estimators.kronecker import KroneckerEstimator, KroneckerSolver, Layer, eigenbasis, sweep

_CHUNK_ELEMENTS = 2**24  # per-example gradient elements held at once


@dataclasses.dataclass(frozen=True, kw_only=True)
class EKFAC(KroneckerEstimator):
    """Eigenvalue-corrected K-FAC for ``nn.Linear``/``nn.Conv2d`` layers.

    Two passes over the curvature's examples: the K-FAC factors (for the eigenbasis), then the
    projected per-example gradients (for the eigenvalues, ``d_out x d_in`` per layer). Solves cost
    the same as K-FAC's. See :class:`KroneckerEstimator` for ``fisher``, the regulariser and
    the damping options.
    """

    name = "ekfac"

    def fit(self, curvature: Curvature) -> KroneckerSolver:
        if curvature.dtype in (torch.float16, torch.bfloat16):
            name = str(curvature.dtype).removeprefix("torch.")
            raise ConfigError(
                f"EK-FAC needs eigendecompositions (torch.linalg.eigh), which have no {name} kernels: "
                "compute in float32 or float64 (Influence(..., dtype=torch.float32))"
            )
        record: dict = {}
        layers, factors = self.factors(curvature, record)
        bases = [(eigenbasis(s)[1], eigenbasis(a)[1]) for a, s in factors]
        values = corrected_eigenvalues(
            curvature,
            layers,
            bases,
            record.get("fisher", self.fisher),  # what "auto" resolved to for the factors
            self.samples,
            self.seed + 1,  # fresh samples
        )
        return self.solver(curvature, layers, factors, bases, values, record)


def corrected_eigenvalues(
    curvature: Curvature,
    layers: list[Layer],
    bases: list[tuple[Tensor, Tensor]],
    fisher: str = "exact",
    samples: int = 1,
    seed: int = 0,
) -> list[Tensor]:
    """Per layer ``Lambda`` ``(d_out, d_in)``: mean squared per-example gradient in the eigenbasis."""
    dtype, device = curvature.dtype, curvature.device
    lam = [torch.zeros(layer.d_out, layer.d_in, dtype=dtype, device=device) for layer in layers]
    n = 0
    for b, acts, directions, _ in sweep(curvature, layers, fisher, samples, seed, "EK-FAC eigenvalues"):
        n += b
        rotated = [[a @ q_a for a in calls] for calls, (_, q_a) in zip(acts, bases, strict=True)]
        for grads, weight in directions:
            for i, (calls, (q_s, _)) in enumerate(zip(grads, bases, strict=True)):
                lam[i] += weight * _squared_gradients([g @ q_s for g in calls], rotated[i])
    return [x / n for x in lam]


def _squared_gradients(g_calls: list[Tensor], a_calls: list[Tensor]) -> Tensor:
    """``sum_i (sum_{calls, t} g_it a_it^T)^2`` elementwise, ``(d_out, d_in)``, from ``(B, T, .)`` rows."""
    if len(g_calls) == 1 and g_calls[0].shape[1] == 1:
        # One position: (g a^T)^2 = g^2 (a^2)^T, so the sum over examples is one product.
        g, a = g_calls[0][:, 0], a_calls[0][:, 0]
        return (g * g).T @ (a * a)
    b, d_out, d_in = g_calls[0].shape[0], g_calls[0].shape[2], a_calls[0].shape[2]
    step = max(1, _CHUNK_ELEMENTS // (d_out * d_in))  # bounds the (step, d_out, d_in) gradients held
    total = g_calls[0].new_zeros(d_out, d_in)
    for s in range(0, b, step):
        parts = zip(g_calls, a_calls, strict=True)
        dw = sum(torch.einsum("bto,bti->boi", g[s : s + step], a[s : s + step]) for g, a in parts)
        total += dw.pow(2).sum(0)
    return total
