"""Shared machinery of the Kronecker-factored estimators (K-FAC, EK-FAC).

The curvature is approximated layer by layer (block-diagonal across layers). A layer maps inputs
``a`` to pre-activations ``s = W a (+ b)``; with the bias as an extra input column of ones, its
parameters form one ``(d_out, d_in)`` matrix ``[W | b]`` and a backpropagated output direction
gives the per-example gradient ``sum_t g_t a_t^T`` over the layer's positions ``t`` (one for a
dense input; every output pixel of a convolution, Grosse & Martens 2016; every token of a
sequence). The Gauss-Newton block of the layer is then approximated by ``S ⊗ A`` with

    A = (1/P) sum_{i,t} a_it a_it^T    (d_in, d_in): mean over all P (example, position) rows,
    S = (1/m) sum_{i,t} g_it g_it^T    (d_out, d_out): mean over the m examples, summed over positions,

so ``S ⊗ A`` has the scale of the per-example curvature (``T E[aa^T] ⊗ E[gg^T]`` for T positions,
the "expand" convention of KFC, Grosse et al. 2023 and Eschenhagen et al. 2023). Flat parameters
are stored row-major, so the block acts as ``X -> S X A^T`` on ``X`` ``(d_out, d_in)``.

The output directions ``g`` are backpropagated from the model's outputs (see ``fisher`` below);
activations and output gradients are captured by forward hooks and tensor hooks while the model
runs under ``functional_call``, one chunk of examples at a time.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, IndefiniteHessianError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.gram import add_upper_gram, mirror_upper
from influencer._kernel.layers import (
    Layer,
    ProbeCapture,
    check_layer_model,
    find_layers,
    supported_parameters,
)
from influencer._kernel.progress import progress_bar
from influencer.estimators.base import Estimator, Solver, require_positive
from influencer.estimators.layer_scores import LayerRows

FISHERS = ("auto", "exact", "sampled", "empirical")
_MAX_OUTPUTS = 1024  # the generic output-Hessian factor is (B, D, D)
_SOLVE_ELEMENTS = 2**18  # elements of the right-hand sides rotated at once (2 MiB in float64)
_SVD_WORK = 2**34  # d_out d_in min(d_out, d_in) of the largest inverse-eigenvalue matrix factored
# the factored form of a solved block replaces the dense one only when it takes at most 1/GAIN of its
# multiplications: its products are thinner and add an elementwise pass, so a closer call is not
# faster (benchmarks/bench_kfac_layer_form.py: a 32 x 65 layer, 15 terms, ran slower factored)
_FACTORED_GAIN = 2


def resolve_fisher(fisher: str, outputs: int, exact_max_outputs: int) -> str:
    """The Fisher ``"auto"`` stands for with ``outputs`` per example: the exact expectation up to
    ``exact_max_outputs`` (one backward pass per output), else sampled labels."""
    if fisher != "auto":
        return fisher
    return "exact" if outputs <= exact_max_outputs else "sampled"


def output_hessian_factor(fn: ModelFunction, outputs: Tensor, batch: Any) -> Tensor:
    """``L`` ``(B, D, D)`` with ``L_b L_b^T`` = Hessian of ``output_loss_b`` in the ``D`` outputs.

    Eigenvalues below zero (a loss non-convex in the outputs) are dropped: the Gauss-Newton
    matrix is then its positive semi-definite part.
    """
    b, d = outputs.shape[0], outputs[0].numel()
    if d > _MAX_OUTPUTS:
        raise ConfigError(
            f"the model has {d} outputs per example; the output-Hessian factor needs D x D per example "
            f"(limit {_MAX_OUTPUTS}) for a task without fisher_directions(). Use fisher='empirical', or "
            "a task whose fisher_directions() samples labels (the built-in classification and language "
            "model tasks) with fisher='sampled'"
        )
    flat = outputs.detach().reshape(b, d)
    g = grad(lambda o: fn.task.output_loss(o.reshape(outputs.shape), batch).sum())
    basis = torch.eye(d, dtype=flat.dtype, device=flat.device)[:, None, :].expand(d, b, d)
    cols = vmap(lambda v: jvp(g, (flat,), (v,))[1])(basis)  # (D, B, D): column c of each H_b
    h = cols.permute(1, 2, 0)
    values, vectors = torch.linalg.eigh(0.5 * (h + h.mT))
    return vectors * values.clamp_min(0).sqrt()[:, None, :]


def sweep(
    curvature: Curvature,
    layers: list[Layer],
    fisher: str,
    samples: int,
    seed: int,
    desc: str,
    exact_max_outputs: int = 0,
    record: dict[str, Any] | None = None,
) -> Iterator[tuple[int, list[list[Tensor]], Iterator[tuple[list[list[Tensor]], float]], Tensor | None]]:
    """For each chunk of the curvature's examples: ``(B, acts, directions, positions)``.

    ``acts[l][k]`` are the activation rows ``(B, T, d_in)`` of layer l's k-th call; iterating
    ``directions`` runs one backward pass per output direction and yields the output-gradient rows
    (same nesting, ``(B, T, d_out)``) with the direction's weight. The weighted sum over directions
    of ``g g^T`` has, per example, the expectation of the chosen Fisher. ``fisher="auto"`` is
    resolved per chunk by :func:`resolve_fisher`; ``record`` (if given) receives the Fisher used
    and the number of outputs per example. ``positions`` ``(B, T)`` bool or None: the task's real
    (not padding) positions (:meth:`~influencer._kernel.task.Task.positions`).
    """
    fn = curvature.fn
    theta = curvature.theta.detach().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    chunks = curvature.data.chunks(curvature.batch_size, curvature.indices)
    total = -(-curvature.n // curvature.batch_size)
    checked = False
    with ProbeCapture(layers) as cap:
        for ids, raw in progress_bar(chunks, desc, curvature.progress, total=total, unit="batch"):
            batch = fn.prepare(raw)
            cap.start(len(ids))
            with torch.enable_grad():
                method = fn.task.loss if fisher == "empirical" else fn.task.outputs
                out = functional_call(fn.bound, fn.state(theta), (method, batch))
            for i, layer in enumerate(layers):
                if not cap.acts[i]:
                    raise ConfigError(
                        f"layer {layer.name!r} was not called by the model's forward (its weights may be "
                        "used functionally); leave it out of params=[...] or use CG/Arnoldi"
                    )
            used = resolve_fisher(fisher, out[0].numel(), exact_max_outputs)
            if record is not None:
                record["fisher"] = used
                if fisher != "empirical":  # out is then the loss, not the outputs
                    record["outputs_per_example"] = out[0].numel()
            directions = _directions(fn, out, batch, used, samples, gen)

            def run(directions=directions, out=out) -> Iterator[tuple[list[list[Tensor]], float]]:
                nonlocal checked
                for cot, weight, last in directions:
                    # The first chunk's last direction also checks the layer model against
                    # autograd's parameter gradient (for the generic factor, the column of the
                    # largest curvature).
                    check = not checked and last
                    rows, g_theta = cap.backward(out, cot, theta if check else None, retain=not last)
                    if check:
                        check_layer_model(layers, cap.acts, rows, g_theta)
                        checked = True
                    yield rows, weight

            yield len(ids), cap.acts, run(), fn.task.positions(batch)


def _directions(fn: ModelFunction, out: Tensor, batch: Any, fisher: str, samples: int, gen: torch.Generator):
    """Output cotangents ``(B, ...)`` to backpropagate, with weights: ``(cot, weight, is_last)``."""
    if fisher == "empirical":
        yield torch.ones_like(out), 1.0, True
        return
    factor = fn.task.fisher_directions(out.detach(), batch, None if fisher == "exact" else samples, gen)
    if factor is None:
        factor = output_hessian_factor(fn, out, batch)  # (B, D, D)
        if fisher == "sampled":
            z = torch.randn(*factor.shape[:2], samples, generator=gen, dtype=factor.dtype).to(factor.device)
            factor = factor @ z  # (B, D, samples): E[(L z)(L z)^T] = L L^T
    cols = factor.shape[-1]
    weight = 1.0 / samples if fisher == "sampled" else 1.0
    for c in range(cols):
        yield factor[..., c].reshape(out.shape), weight, c == cols - 1


# ---- factors and eigenbases --------------------------------------------------------------------


def covariance_factors(
    curvature: Curvature,
    layers: list[Layer],
    fisher: str = "exact",
    samples: int = 1,
    seed: int = 0,
    exact_max_outputs: int = 0,
    record: dict[str, Any] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(A (d_in, d_in), S (d_out, d_out))`` as defined in the module docstring
    (``exact_max_outputs`` and ``record``: see :func:`sweep`)."""
    dtype, device = curvature.dtype, curvature.device
    A = [torch.zeros(layer.d_in, layer.d_in, dtype=dtype, device=device) for layer in layers]
    S = [torch.zeros(layer.d_out, layer.d_out, dtype=dtype, device=device) for layer in layers]
    rows = [0] * len(layers)
    n = 0
    chunks = sweep(curvature, layers, fisher, samples, seed, "K-FAC factors", exact_max_outputs, record)
    for b, acts, directions, positions in chunks:
        n += b
        for i, calls in enumerate(acts):
            for a in calls:
                # Padding positions are left out of the average for layers that run once per
                # position: their inputs are whatever the padding token gives, and their number
                # depends on how far each batch was padded (their output gradients are 0).
                real = positions is not None and a.shape[:2] == positions.shape
                a = a[positions.to(a.device)] if real else a.flatten(0, 1)  # (rows, d_in)
                add_upper_gram(A[i], a)  # the blocks below the diagonal are mirrored once, at the end
                rows[i] += a.shape[0]
        for grads, weight in directions:
            for i, calls in enumerate(grads):
                for g in calls:
                    add_upper_gram(S[i], g.flatten(0, 1), alpha=weight)  # rows (B*T, d_out)
    return [(mirror_upper(a) / r, mirror_upper(s) / n) for a, s, r in zip(A, S, rows, strict=True)]


def eigenbasis(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD) and eigenvectors of a symmetric factor."""
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T).to(torch.float64))
    return values.clamp_min(0).to(m.dtype), vectors.to(m.dtype)


def regularizer_curvature(fn: ModelFunction, theta: Tensor, layers: list[Layer], seed: int) -> list[float]:
    """Per layer ``c`` with ``Hess(Omega) ~ c I`` on that layer's block; exact for L2 weight decay.

    The Hessian of Omega is probed with one Gaussian vector. If it is not a multiple of the
    identity per layer (e.g. decay on weights but not biases) each block gets its mean curvature,
    with a warning: K-FAC's eigenbasis cannot hold a general regulariser Hessian exactly.
    """
    constant = fn.task.regularizer_curvature()
    if constant is not None:  # Omega = c/2 ||theta||^2: no probe needed
        return [float(constant)] * len(layers)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
    hv = jvp(grad(fn.regularizer), (theta,), (v,))[1]
    out, residual = [], 0.0
    for layer in layers:
        vl, hl = v[layer.index], hv[layer.index]
        c = float(vl @ hl) / float(vl @ vl)
        out.append(c)
        residual += float((hl - c * vl).pow(2).sum())
    if residual > (1e-6 * float(hv.norm())) ** 2:
        warnings.warn(
            "the task's regularizer Hessian is not a multiple of the identity on each layer; K-FAC "
            "includes it as each layer's average curvature (exact only for L2 weight decay on all "
            "parameters of a layer)",
            RuntimeWarning,
            stacklevel=4,
        )
    return out


# ---- configuration and solver ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class KroneckerEstimator(Estimator):
    """Settings shared by :class:`KFAC` and :class:`EKFAC`.

    ``fisher`` chooses how the expectation over outputs is taken (the first three equal the
    Gauss-Newton matrix ``J^T H_out J`` in expectation; for cross-entropy and squared error it is
    the true Fisher of the model's predictive distribution):

    * ``"auto"`` (default): ``"exact"`` when the model has at most ``exact_max_outputs`` outputs
      per example (default 2: binary classifiers, scalar regression), else ``"sampled"``. The
      exact expectation costs one backward pass per output (10 for ten classes, a vocabulary
      per token for a language model); one sampled label per example costs one, and its noise
      averages out over the examples (kronfluence's default true Fisher). The Fisher used is
      in the solver's ``info["fisher"]``.
    * ``"exact"``: every column of a factor of each example's output Hessian ``H_out = L L^T`` is
      backpropagated (for cross-entropy ``sqrt(p_c) (e_c - p)``, one per class): ``D`` backward
      passes per chunk for ``D`` outputs, no sampling noise. Needs a task with ``outputs`` and
      ``output_loss``.
    * ``"sampled"``: ``samples`` random directions per example with ``E[c c^T] = H_out``, one
      backward pass each: for the built-in classification and language-model tasks the loss's
      gradient at a label drawn from the model's own prediction (``Task.fisher_directions``),
      otherwise ``L z`` with ``z ~ N(0, I)``. Drawn with ``seed``.
    * ``"empirical"``: the gradient of each example's actual loss (the empirical Fisher): one
      backward pass, works for any task, but biased away from the optimum's curvature.

    The curvature is always this positive semi-definite Gauss-Newton approximation, whatever
    ``Influence(curvature=...)`` says. The regulariser's Hessian is added per layer (exact for L2
    weight decay, see :func:`regularizer_curvature`), then ``damping`` and ``relative_damping``
    times the layer's mean eigenvalue (Grosse et al. 2023 use 0.1).
    """

    fisher: str = "auto"
    samples: int = 1
    seed: int = 0
    relative_damping: float = 0.0
    exact_max_outputs: int = 2
    name: ClassVar[str] = "kronecker"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fisher not in FISHERS:
            raise ConfigError(f"{type(self).__name__}.fisher must be one of {FISHERS}, got {self.fisher!r}")
        require_positive(f"{type(self).__name__}.samples", self.samples, integer=True)
        require_positive(f"{type(self).__name__}.exact_max_outputs", self.exact_max_outputs, integer=True)
        if not isinstance(self.seed, int):
            raise ConfigError(f"{type(self).__name__}.seed must be an integer, got {self.seed!r}")
        if not (
            isinstance(self.relative_damping, (int, float))
            and math.isfinite(self.relative_damping)
            and self.relative_damping >= 0
        ):
            raise ConfigError(
                f"{type(self).__name__}.relative_damping must be a finite number >= 0, "
                f"got {self.relative_damping!r}"
            )

    def supported_parameters(self, model: nn.Module) -> list[str]:
        """Trainable weights and biases of the supported layers; warns listing the ones left out."""
        chosen, skipped = supported_parameters(model)
        if not chosen:
            raise ConfigError(
                f"{type(self).__name__} found no trainable nn.Linear, nn.Conv2d or transformers Conv1D "
                "layer in the model; use CG, LiSSA or Arnoldi"
            )
        if skipped:
            listed = ", ".join(f"{n} ({why})" for n, why in skipped.items())
            warnings.warn(
                f"params='supported': {type(self).__name__} models {len(chosen)} parameter tensors of "
                f"Linear/Conv layers and leaves out {len(skipped)}: {listed}",
                UserWarning,
                stacklevel=3,
            )
        return chosen

    def factors(
        self, curvature: Curvature, record: dict[str, Any] | None = None
    ) -> tuple[list[Layer], list[tuple[Tensor, Tensor]]]:
        """The layers and their ``(A, S)`` factors for this curvature's examples and parameters;
        ``record`` (if given) receives the Fisher used (see :func:`sweep`)."""
        if self.fisher != "empirical" and not curvature.fn.task.supports_gauss_newton:
            raise ConfigError(
                f"fisher={self.fisher!r} needs a task with outputs(model, batch) and output_loss(outputs, "
                "batch) (the built-in tasks have them); for a task that overrides loss(), use "
                "fisher='empirical'"
            )
        layers = find_layers(curvature.fn)
        factors = covariance_factors(
            curvature, layers, self.fisher, self.samples, self.seed, self.exact_max_outputs, record
        )
        return layers, factors

    def fisher_used(self) -> str:
        """In words, which Fisher ``fisher`` stands for (for settings and reports)."""
        exact = "the exact expectation over the model's outputs (one backward pass per output)"
        sampled = (
            f"{self.samples} label(s) per example sampled from the model's prediction (random "
            "output directions of the same expectation for tasks that cannot sample labels)"
        )
        return {
            "auto": f"{exact} when the model has at most {self.exact_max_outputs} outputs per example, "
            f"else {sampled}",
            "exact": exact,
            "sampled": sampled,
            "empirical": "the empirical Fisher (gradients at the observed labels)",
        }[self.fisher]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "fisher_used": self.fisher_used()}

    def solver(
        self,
        curvature: Curvature,
        layers: list[Layer],
        factors: list[tuple[Tensor, Tensor]],
        bases: list[tuple[Tensor, Tensor]],
        values: list[Tensor],
        record: dict[str, Any] | None = None,
    ) -> KroneckerSolver:
        reg = regularizer_curvature(curvature.fn, curvature.theta, layers, self.seed)
        solver = KroneckerSolver(layers, factors, bases, values, reg, self, curvature.p)
        if record:  # the Fisher "auto" resolved to, and the outputs per example it was chosen by
            solver.info.update(record)
            if record.get("fisher") == "sampled":
                solver.info["fisher_samples"] = self.samples
        return solver

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> KroneckerSolver:
        layers = find_layers(curvature.fn)
        shapes = [(layer.d_out, layer.d_in) for layer in layers]
        saved = [tuple(state[f"{i}.values"].shape) for i in range(len(state) // len(KroneckerSolver._PARTS))]
        if shapes != saved:
            raise ConfigError(
                f"the saved {self.name} state has layers {saved}, this model {shapes}: fit() anew"
            )
        return KroneckerSolver.from_state(layers, state, self, curvature.p)


class KroneckerSolver(Solver):
    """``V -> Q_S [(Q_S^T V Q_A) / (values + c + damping)] Q_A^T`` per layer block.

    ``factors[l] = (A, S)``; ``bases[l] = (Q_S (d_out, d_out), Q_A (d_in, d_in))``, their
    eigenvectors; ``values[l]`` ``(d_out, d_in)`` are the curvature's eigenvalues in that basis
    (``d_S d_A^T`` for K-FAC, fitted ones for EK-FAC); ``c`` is the regulariser's curvature.
    """

    def __init__(
        self,
        layers: list[Layer],
        factors: list[tuple[Tensor, Tensor]],
        bases: list[tuple[Tensor, Tensor]],
        values: list[Tensor],
        reg: list[float],
        config: KroneckerEstimator,
        p: int,
    ) -> None:
        self.layers, self.factors, self.bases, self.p = layers, factors, bases, p
        self.values = [v + c for v, c in zip(values, reg, strict=True)]  # curvature incl. Omega
        self.damped = []
        for layer, v in zip(layers, self.values, strict=True):
            d = v + config.damping + config.relative_damping * float(v.mean())
            lo, hi = float(d.min()), float(d.max())
            if lo <= max(abs(hi), 1e-30) * torch.finfo(d.dtype).eps * 10:
                raise IndefiniteHessianError(
                    f"the {config.name} curvature of layer {layer.name!r} plus damping ({config.damping:g}) "
                    f"is singular or indefinite: eigenvalues in [{lo:.3g}, {hi:.3g}]. Pass damping > 0 "
                    f"(e.g. damping={max(abs(hi) * 1e-3, 1e-8):.2g}) or relative_damping (e.g. 0.1)"
                )
            self.damped.append(d)
        self._describe(config, reg)

    def _describe(self, config: KroneckerEstimator, reg: list[float]) -> None:
        self.config, self.reg = config, reg
        self.info = {
            "layers": [layer.name for layer in self.layers],
            "fisher": config.fisher,
            "regularizer_curvature": reg,
            "min_eigenvalue": min(float(v.min()) for v in self.values),
            "max_eigenvalue": max(float(v.max()) for v in self.values),
        }

    _PARTS = ("A", "S", "Q_S", "Q_A", "values", "damped")

    def state_dict(self) -> dict[str, Tensor]:
        """Per layer ``i``: ``i.A``, ``i.S`` (factors), ``i.Q_S``, ``i.Q_A`` (eigenbases), ``i.values``
        (eigenvalues incl. the regulariser), ``i.damped``; and ``regularizer`` ``(layers,)``."""
        out = {"regularizer": torch.tensor(self.reg, dtype=torch.float64)}
        parts = zip(self.factors, self.bases, self.values, self.damped, strict=True)
        for i, ((a, s), (qs, qa), v, d) in enumerate(parts):
            out.update(zip([f"{i}.{k}" for k in self._PARTS], (a, s, qs, qa, v, d), strict=True))
        return out

    @classmethod
    def from_state(
        cls, layers: list[Layer], state: dict[str, Tensor], config: KroneckerEstimator, p: int
    ) -> KroneckerSolver:
        """The solver whose :meth:`state_dict` is ``state``, for the same ``layers``."""
        solver = object.__new__(cls)
        solver.layers, solver.p = layers, p
        a, s, qs, qa, v, d = ([state[f"{i}.{k}"] for i in range(len(layers))] for k in cls._PARTS)
        solver.factors = list(zip(a, s, strict=True))
        solver.bases = list(zip(qs, qa, strict=True))
        solver.values, solver.damped = v, d
        solver._describe(config, state["regularizer"].tolist())
        return solver

    def solve(self, vectors: Tensor) -> Tensor:
        v = vectors.reshape(-1, self.p).to(self.damped[0])
        out = torch.empty_like(v)
        # Rows in chunks of about _SOLVE_ELEMENTS, so the rotated blocks stay in cache; each rotation
        # is one matrix product over all rows of a chunk, not one small product per row.
        step = max(1, _SOLVE_ELEMENTS // self.p)
        for s in range(0, v.shape[0], step):
            rows = v[s : s + step]
            c = rows.shape[0]
            for layer, (qs, qa), d in zip(self.layers, self.bases, self.damped, strict=True):
                block = rows[:, layer.index].view(c, layer.d_out, layer.d_in)
                out[s : s + step, layer.index] = _solve_blocks(block, qs, qa, d).view(c, -1)
        return out.reshape(vectors.shape).to(vectors.dtype)

    def solve_rows(self, rows: LayerRows) -> LayerRows:
        """:meth:`solve` of gradients given in layer form (the test gradients' rows), in layer form.

        In the eigenbasis the solve divides ``Q_S^T G Q_A`` entry by entry by the damped
        eigenvalues. Where their inverse ``K`` ``(d_out, d_in)`` has a low numerical rank ``R``
        (K-FAC's ``1 / (s_j a_k + damping)``: about 20 at float64 precision, whatever the layer's
        size), ``K = sum_r u_r w_r^T`` up to rounding, and a block ``G = sum_t g_t a_t^T`` solves to

            sum_{t, r} [Q_S (u_r * Q_S^T g_t)] [Q_A (w_r * Q_A^T a_t)]^T,

        ``T R`` rank-one terms: scored against a training example's rows at ``T T' R (d_out +
        d_in)`` multiplications instead of ``d_out d_in`` (:class:`LayerScorer`). A layer where that
        is not cheaper (many positions, a narrow layer, or EK-FAC's fitted eigenvalues, whose inverse
        has no low rank) gets its dense solved block in ``blocks``. ``K``'s singular values below
        the dtype's epsilon times the largest are dropped: below the rounding of the products.
        """
        acts: list[list[Tensor]] = []
        grads: list[list[Tensor]] = []
        blocks: list[Tensor | None] = []
        for i, (layer, (qs, qa), d) in enumerate(zip(self.layers, self.bases, self.damped, strict=True)):
            held = rows.dense_block(i) is not None
            factors = None if held else self._inverse_factors(i, sum(a.shape[1] for a in rows.acts[i]))
            if factors is None:
                g = rows.block(layer, i, d)  # (m, d_out, d_in)
                solved = torch.empty_like(g)
                step = max(1, _SOLVE_ELEMENTS // d.numel())  # blocks rotated at once
                for s in range(0, rows.m, step):
                    solved[s : s + step] = _solve_blocks(g[s : s + step], qs, qa, d)
                blocks.append(solved)
                acts.append([])
                grads.append([])
                continue
            u, w = factors
            blocks.append(None)
            acts.append([_spread(a, qa, w) for a in rows.acts[i]])
            grads.append([_spread(g, qs, u) for g in rows.grads[i]])
        return LayerRows(acts, grads, rows.m, blocks if any(b is not None for b in blocks) else None)

    def quadratic_rows(self, rows: LayerRows) -> Tensor:
        """``g_j^T (H + damping I)^-1 g_j`` ``(m,)`` for gradients given in layer form (no ``p``-dim
        vector is formed).

        Per layer the solve is diagonal in the eigenbasis, so the form is ``sum(G~^2 / damped)``
        with ``G~ = Q_S^T G Q_A``. With one position ``G~ = (Q_S^T g)(Q_A^T a)^T`` and the sum is
        ``(Q_S^T g)^2 . (1 / damped) (Q_A^T a)^2``: one product, ``d_out d_in`` multiplications per
        example against a solve's ``d_out d_in (d_out + d_in)``; with several positions ``G~`` is
        formed per example (``T d_out d_in``), in bounded chunks.
        """
        out = None
        for i, ((qs, qa), d) in enumerate(zip(self.bases, self.damped, strict=True)):
            calls = list(zip(rows.grads[i], rows.acts[i], strict=True))
            if not calls:
                continue
            inverse = 1 / d
            if len(calls) == 1 and calls[0][0].shape[1] == 1:
                g, a = calls[0][0][:, 0] @ qs, calls[0][1][:, 0] @ qa  # (m, d_out), (m, d_in)
                part = ((g * g) @ inverse).mul_(a * a).sum(dim=1)
            else:
                part = d.new_empty(rows.m)
                step = max(1, _SOLVE_ELEMENTS // d.numel())  # examples' blocks formed at once
                for s in range(0, rows.m, step):
                    block = sum(
                        torch.einsum("bto,bti->boi", g[s : s + step] @ qs, a[s : s + step] @ qa)
                        for g, a in calls
                    )
                    part[s : s + step] = (block * block * inverse).sum(dim=(1, 2))
            out = part if out is None else out + part
        return out if out is not None else self.damped[0].new_zeros(rows.m)

    def _inverse_factors(self, i: int, positions: int) -> tuple[Tensor, Tensor] | None:
        """``(U (d_out, R), W (d_in, R))`` with ``U W^T = 1 / damped[i]`` to the dtype's precision,
        if the factored rows of a block of ``positions`` rows score cheaper than its dense block
        (against training rows of as many positions); else None."""
        layer = self.layers[i]
        o, n = layer.d_out, layer.d_in

        def pays(rank: int) -> bool:
            return _FACTORED_GAIN * positions * positions * rank * (o + n) <= o * n

        cache: dict[int, tuple[Tensor, Tensor] | None] = self.__dict__.setdefault("_inverse_rank", {})
        if i not in cache:
            # not even rank 1 would pay, or the factorisation would take longer than it saves
            cache[i] = _low_rank(1 / self.damped[i]) if pays(1) and o * n * min(o, n) <= _SVD_WORK else None
        factors = cache[i]
        return factors if factors is not None and pays(factors[0].shape[1]) else None

    def dense(self) -> Tensor:
        """The approximated curvature (without damping) as a ``(p, p)`` matrix (small models only)."""
        if self.p > 20_000:
            raise ConfigError(f"dense() would build a {self.p}x{self.p} matrix; it is meant for small models")
        ref = self.values[0]
        m = torch.zeros(self.p, self.p, dtype=ref.dtype, device=ref.device)
        for layer, (qs, qa), v in zip(self.layers, self.bases, self.values, strict=True):
            q = torch.kron(qs, qa)  # eigenvectors of S ⊗ A in row-major [W | b] layout
            m[layer.index[:, None], layer.index[None, :]] = (q * v.reshape(-1)) @ q.T
        return m


def _solve_blocks(x: Tensor, qs: Tensor, qa: Tensor, d: Tensor) -> Tensor:
    """``Q_S [(Q_S^T X Q_A) / d] Q_A^T`` for blocks ``x`` ``(c, d_out, d_in)``: each rotation is one
    matrix product over all ``c`` blocks, not ``c`` small products."""
    c, o, i = x.shape
    x = (x.reshape(c * o, i) @ qa).view(c, o, i)  # X Q_A
    x = x.transpose(0, 1).reshape(o, c * i)  # (d_out, c d_in)
    x = (qs.T @ x).view(o, c, i).div_(d[:, None, :])  # Q_S^T X Q_A / d: the eigenbasis
    x = (qs @ x.view(o, c * i)).view(o, c, i).transpose(0, 1).reshape(c * o, i)
    return (x @ qa.T).view(c, o, i)


def _low_rank(k: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, W)`` with ``U W^T = k`` ``(d_out, d_in)`` up to singular values below the dtype's
    epsilon times the largest (an SVD in float64)."""
    u, s, vh = torch.linalg.svd(k.double(), full_matrices=False)
    rank = max(1, int((s > s[0] * torch.finfo(k.dtype).eps).sum()))
    return (u[:, :rank] * s[:rank]).to(k.dtype), vh[:rank].T.to(k.dtype)


def _spread(x: Tensor, q: Tensor, f: Tensor) -> Tensor:
    """Rows ``(m, T, d)`` -> ``(m, T R, d)``: ``Q (f_r * Q^T x_t)`` for each position ``t`` and term
    ``r`` (position-major, the same order on both sides of a layer)."""
    m, t, d = x.shape
    rotated = (x @ q)[:, :, None, :]  # (m, T, 1, d): Q^T x_t as rows
    return ((rotated * f.T) @ q.T).reshape(m, t * f.shape[1], d)
