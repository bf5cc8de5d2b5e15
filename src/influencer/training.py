"""Training a model to the optimum of its objective, as influence functions assume.

``fit_lbfgs`` minimises ``J(theta) = mean_{i in S} loss_i(theta) + Omega(theta)`` over the chosen
parameters with full-batch L-BFGS (strong-Wolfe line search). For convex models (linear,
logistic, smooth-hinge SVM with L2) this reaches the unique optimum, which makes leave-one-out
retraining exact enough to validate influence against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.data import Examples, as_examples, to_device
from influencer._kernel.errors import ConvergenceError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar
from influencer._kernel.task import Task
from influencer.estimators.cg import CG


def objective_and_grad(
    fn: ModelFunction,
    theta: Tensor,
    data: Examples,
    indices: Tensor,
    batch_size: int,
    weights: Tensor | None = None,
) -> tuple[float, Tensor]:
    """``J(theta)`` over ``indices`` and its gradient ``(p,)``, accumulated chunk by chunk.

    ``weights`` ``(n,)``: data weights by training id (each term ``w_i (loss_i + Omega)``).
    """
    theta = theta.detach().requires_grad_(True)
    total = 0.0
    g = torch.zeros_like(theta)
    for ids, batch in data.chunks(batch_size, indices):
        w = None if weights is None else weights[ids].to(theta)
        value = fn.objective(theta, fn.prepare(batch), 1.0 / len(indices), w)
        g += torch.autograd.grad(value, theta)[0]
        total += float(value.detach())
    return total, g


# Chord steps tried before L-BFGS on a warm-started refit: each must shrink the gradient by
# CHORD_CONTRACTION (a refit on half the data contracts by about 0.5-0.7 a step: still far cheaper
# than L-BFGS's line searches), and past grad_tol they polish while they halve it.
CHORD_STEPS = 100
CHORD_CONTRACTION = 0.8


def fit_lbfgs(
    fn: ModelFunction,
    data: Examples,
    indices: Sequence[int] | Tensor | None = None,
    theta0: Tensor | None = None,
    *,
    max_iter: int = 2000,
    grad_tol: float = 1e-10,
    newton_steps: int = 5,
    inverse_hessian: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 4096,
    weights: Tensor | None = None,
) -> Tensor:
    """Parameters ``(p,)`` minimising ``J`` over examples ``indices`` (default all), from ``theta0``.

    L-BFGS's line search stops once ``J`` is flat to machine precision, which can leave the
    gradient around 1e-9; Newton steps then polish it to round-off. Warm-started from ``theta0``
    with ``inverse_hessian``, chord steps come first (a refit without a few examples is usually
    done by them alone). After L-BFGS: first up to ``newton_steps``
    steps with ``inverse_hessian`` ``(1, p) -> (1, p)`` when given (a fixed approximation of
    ``H^-1`` near the optimum, e.g. the full-data Hessian when refitting without a few points),
    then up to ``newton_steps`` exact Newton-CG steps at the current point.
    Raises :class:`ConvergenceError` if max ``|grad J|`` is still above ``grad_tol`` (relative to
    ``max(1, |J|)``).
    """
    idx = data.check_indices(indices)
    theta = (fn.theta0 if theta0 is None else theta0).detach().clone().to(fn.device, fn.dtype)
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS(
        # L-BFGS brings the gradient near 1e-7; Newton steps are far cheaper from there on.
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25),
        tolerance_grad=max(grad_tol, 1e-7) if newton_steps else grad_tol,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        value, g = objective_and_grad(fn, theta, data, idx, batch_size, weights)
        theta.grad = g
        return torch.tensor(value, dtype=theta.dtype)

    def gradient() -> tuple[Tensor, bool]:
        value, g = objective_and_grad(fn, theta, data, idx, batch_size, weights)
        return g, float(g.abs().max()) <= grad_tol * max(1.0, abs(value))

    if inverse_hessian is not None and theta0 is not None:
        # Warm-started near the optimum of a nearby objective (a refit without a few examples):
        # chord steps with the fixed inverse contract the gradient by a constant factor each, for
        # the price of one gradient pass, where L-BFGS would spend hundreds on an ill-conditioned
        # problem. They go on past grad_tol while they still halve the gradient (to round-off, as
        # the Newton polish below does); L-BFGS takes over if they stop paying before grad_tol.
        g, done = gradient()
        for _ in range(CHORD_STEPS):
            step = inverse_hessian(g[None])[0]
            with torch.no_grad():
                theta -= step
            new_g, new_done = gradient()
            ratio = float(new_g.abs().max()) / max(float(g.abs().max()), 1e-300)
            if ratio >= 1.0:
                with torch.no_grad():  # no progress: undo
                    theta += step
                break
            g, done = new_g, new_done
            if ratio > (0.5 if done else CHORD_CONTRACTION):
                break  # converged and no longer halving, or too slow: L-BFGS takes over
        if done:
            return theta.detach()
    # LBFGS.step may stop early on a flat line search; restarting resets its curvature memory.
    for _ in range(3):
        opt.step(closure)
        g, done = gradient()
        if done:
            return theta.detach()
        if newton_steps and float(g.abs().max()) <= 1e-7:
            break
    # Cheap chord steps with the fixed inverse first; exact Newton-CG steps if those stall (the
    # fixed curvature can be far off when a removed point carried much of it, e.g. an SVM margin).
    for _ in range(newton_steps if inverse_hessian is not None else 0):
        step = inverse_hessian(g[None])[0]
        with torch.no_grad():
            theta -= step
        new_g, done = gradient()
        if done:
            return theta.detach()
        if float(new_g.abs().max()) >= float(g.abs().max()):
            with torch.no_grad():  # no progress: undo and go exact
                theta += step
            break
        g = new_g
    for _ in range(newton_steps):
        curvature = Curvature(fn, theta.detach(), data, idx, batch_size=batch_size)
        # A Newton step only has to shrink an already small gradient, so a loose solve suffices.
        step = CG(tol=1e-4, max_iter=500).fit(curvature).solve(g[None])[0]
        with torch.no_grad():
            theta -= step
        g, done = gradient()
        if done:
            return theta.detach()
    raise ConvergenceError(
        f"L-BFGS did not reach the optimum: max |grad J| = {float(g.abs().max()):.3g} > {grad_tol:g}. "
        "Is the objective convex (add weight decay) and the data scaled? Raise max_iter or grad_tol"
    )


def train_minibatch(
    model: torch.nn.Module,
    task: Task,
    train: Any,
    *,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place with Adam on ``mean loss + Omega``; returns the loss per epoch.

    For networks, where full-batch L-BFGS is impractical. The model is left in eval mode.
    """
    data = as_examples(train)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in progress_bar(range(epochs), "training", progress, unit="epoch"):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for idx, batch in data.chunks(batch_size, order):
            batch = to_device(batch, device)
            loss = task.loss(model, batch).mean()
            objective = loss + task.regularizer(dict(model.named_parameters()))
            opt.zero_grad()
            objective.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(data))
    model.eval()
    return history


def train_lbfgs(
    model: torch.nn.Module,
    task: Task,
    train: Any,
    *,
    params: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Train ``model`` in place to the optimum of ``mean loss + Omega`` (see :func:`fit_lbfgs`).

    ``params`` limits training to some parameters (the rest stay fixed); ``options`` go to
    :func:`fit_lbfgs`. Returns the model, in eval mode.
    """
    fn = ModelFunction(model, task, params, device, dtype)
    fn.load_into(fit_lbfgs(fn, as_examples(train), **options))
    return model
