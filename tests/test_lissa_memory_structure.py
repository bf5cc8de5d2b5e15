"""LiSSA's memory does not grow with depth: checked structurally, without timing or RSS.

The solver must (1) update one iterate buffer in place, (2) keep no autograd history, and
(3) let each step's Hessian-vector product die before the next one, so the set of live tensors
is the same at step 5 as at the last step. ``benchmarks/bench_lissa_memory.py`` measures the
resulting peak memory; these tests pin the structure that makes it flat.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from influencer import ClassificationTask, Influence, LiSSA
from influencer.datasets import load_tabular
from influencer.models import LogisticRegression

DEPTH = 60


class Recorder:
    """Wraps ``Curvature.sample_matvec`` to watch the iterate and the products step by step."""

    def __init__(self, curvature) -> None:
        self.inner = curvature.sample_matvec
        self.iterate_ptrs: list[int] = []
        self.iterate_grad: list[bool] = []
        self.products: list[weakref.ref] = []
        self.alive_products: list[int] = []  # earlier products still alive when a step starts
        self.live_tensors: dict[int, int] = {}  # step -> number of live tensors at its start
        curvature.sample_matvec = self

    def __call__(self, vectors, generator, batch_size):
        step = len(self.iterate_ptrs) + 1
        self.iterate_ptrs.append(vectors.data_ptr())
        self.iterate_grad.append(vectors.requires_grad or vectors.grad_fn is not None)
        self.alive_products.append(sum(r() is not None for r in self.products))
        if step in (5, DEPTH):
            gc.collect()
            self.live_tensors[step] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        out = self.inner(vectors, generator, batch_size)
        self.products.append(weakref.ref(out))
        return out


@pytest.fixture(scope="module")
def fitted() -> Influence:
    split = load_tabular("iris", dtype=torch.float64)
    torch.manual_seed(0)
    model = LogisticRegression(4, 3).double()
    # Memory structure does not depend on the optimum; a fixed scale keeps the solve convergent.
    estimator = LiSSA(damping=0.1, depth=DEPTH, scale=10.0, batch_size=16)
    return Influence(model, ClassificationTask(weight_decay=1e-2), split.train, estimator=estimator).fit()


def solve_recorded(inf: Influence, vectors: torch.Tensor) -> tuple[torch.Tensor, Recorder]:
    solver = inf.estimator.fit(inf.curvature)
    recorder = Recorder(solver.curvature)
    try:
        out = solver.solve(vectors)
    finally:
        del solver.curvature.sample_matvec  # drop the instance attribute: the method is back
    return out, recorder


@pytest.fixture(scope="module")
def vectors(fitted: Influence) -> torch.Tensor:
    return fitted.gradients(fitted.train.take(torch.arange(3)))  # (3, p)


@pytest.fixture(scope="module")
def recorded(fitted: Influence, vectors: torch.Tensor) -> tuple[torch.Tensor, Recorder]:
    return solve_recorded(fitted, vectors)


def test_iterate_is_one_buffer_updated_in_place(recorded: tuple[torch.Tensor, Recorder]) -> None:
    out, rec = recorded
    assert len(rec.iterate_ptrs) == DEPTH
    assert len(set(rec.iterate_ptrs)) == 1, "LiSSA allocated a new iterate during the recursion"
    assert not any(rec.iterate_grad), "the LiSSA iterate carries autograd history"
    assert out.grad_fn is None and not out.requires_grad


def test_each_product_is_freed_before_the_next_step(recorded: tuple[torch.Tensor, Recorder]) -> None:
    _, rec = recorded
    # At the start of a step only the previous step's product may still be referenced.
    assert max(rec.alive_products) <= 1, f"products accumulate: up to {max(rec.alive_products)} alive"


def test_live_tensor_count_is_the_same_at_step_5_and_at_the_last_step(
    recorded: tuple[torch.Tensor, Recorder],
) -> None:
    _, rec = recorded
    assert set(rec.live_tensors) == {5, DEPTH}
    assert rec.live_tensors[DEPTH] == rec.live_tensors[5], rec.live_tensors


def test_recorded_solve_is_the_real_solve(
    fitted: Influence, vectors: torch.Tensor, recorded: tuple[torch.Tensor, Recorder]
) -> None:
    # Guards the wrapper: the watched solve gives exactly the numbers of an unwatched one.
    plain = fitted.estimator.fit(fitted.curvature).solve(vectors)
    torch.testing.assert_close(recorded[0], plain, rtol=0, atol=0)


def test_inputs_that_require_grad_do_not_make_the_recursion_keep_a_graph(
    fitted: Influence, vectors: torch.Tensor
) -> None:
    out, rec = solve_recorded(fitted, vectors.clone().requires_grad_(True))
    assert not any(rec.iterate_grad), "the LiSSA iterate carries autograd history"
    assert out.grad_fn is None
