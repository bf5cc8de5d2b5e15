"""Inverse-HVP directions and training-gradient chunks, through the run directory's cache.

Both sections are keyed by :meth:`influencer.Influence.settings`, the single source of what a
result depends on: the ``gradients`` section by ``settings()["gradients"]`` and the chunk size, the
``directions`` section by the whole of ``settings()``. Weights, model code and training data are
components of their own (the log names which one changed); everything else is one ``settings``
component whose details say which setting changed. A repeated run recomputes nothing, a changed
input is recomputed, an input that cannot be fingerprinted is never served from the cache, and an
interrupted run resumes from its finished entries.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from influencer.app.run.logs import Stopwatch
from influencer.app.run.store import RunStore, Section, jsonable
from influencer.data import Examples
from influencer.errors import NonFiniteError
from influencer.fingerprint import hash_json, hash_tensors, unverifiable
from influencer.influence import Influence
from influencer.scores import removal_scores

log = logging.getLogger("influencer.explain")

# Test directions solved together: one block solve shares its passes over the data, and a run
# interrupted mid-way keeps the groups already finished.
SOLVE_GROUP = 8
# How settings()["curvature"] entries are named in the log ("estimator.damping 0.001 -> 0.01").
_CURVATURE_LABELS = {"kind": "curvature", "examples": "hessian_examples"}


def cache_key(settings: Mapping[str, Any], **extra: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """``(components, details)`` of a cache section from :meth:`Influence.settings` (or its
    ``"gradients"`` part alone) and ``extra`` settings that shape the entries (e.g. the chunk size).

    Every part of ``settings`` goes into exactly one component, so nothing it lists can change
    without the section noticing; ``details`` are the readable settings behind ``"settings"``.
    """
    gradients = dict(settings["gradients"])
    model = dict(gradients.pop("model"))
    components = {
        "model weights": str(model.pop("state")),
        "model code": hash_json(model.pop("classes")),
        "training data": str(gradients.pop("train")),
    }
    details: dict[str, Any] = {**gradients, **extra}
    if model:
        details["model"] = model
    if "curvature" in settings:
        details.update({_CURVATURE_LABELS.get(k, k): v for k, v in settings["curvature"].items()})
    components["settings"] = hash_json(details)
    return components, details


def open_sections(store: RunStore, inf: Influence, chunk: int) -> tuple[Section, Section]:
    """The ``(directions, gradients)`` sections for ``inf``, with ``chunk`` examples per gradient entry.

    When something the results depend on cannot be fingerprinted (a class whose source cannot be
    read, a task attribute without a reproducible value), the cache cannot tell whether it changed
    since the entries were written: they are not reused, and the log says why.
    """
    settings = inf.settings()
    log.debug("cache fingerprints from Influence.settings(): %s", settings)
    directions_key = cache_key(settings)
    gradients_key = cache_key({"gradients": settings["gradients"]}, chunk=chunk)
    unknown = unverifiable(settings["gradients"])
    if unknown:
        log.warning(
            "not reusing cached gradients or solves: the cache cannot tell whether %s changed since "
            "they were computed (%s); define such classes and functions in a .py file and give the "
            "task plain attribute values to have them reused",
            ", ".join(unknown),
            "source code that Python cannot read: a notebook, the REPL or generated code?"
            if any(not name.startswith("task attribute") for name in unknown)
            else "a value without a reproducible fingerprint",
        )
        nonce = uuid.uuid4().hex  # differs from any recorded fingerprint: the entries are recomputed
        for components, _ in (directions_key, gradients_key):
            components["model code"] = f"unverifiable {nonce}"
    directions = store.section("directions", *directions_key)
    gradients = store.section("gradients", *gradients_key)
    return directions, gradients


def test_directions(
    inf: Influence, test: Examples, test_ids: np.ndarray, section: Section, progress: bool, clock: Stopwatch
) -> np.ndarray:
    """``s_test = H^-1 grad f(z_test)`` for each chosen test example ``(m, p)``, from the cache or solved.

    Entries are keyed by test id and a fingerprint of that example's data, so a changed test set
    is never served stale directions. They are solved in groups by test id (ids ``[8 b, 8 b + 8)``
    of :data:`SOLVE_GROUP` = 8 form group ``b``), and a group is reused only whole: a solve's last
    bits depend on which vectors are solved together (a block solver couples them; a matrix
    product's blocking follows their number), so a run resumed after an interruption solves
    exactly the groups an uninterrupted run solves, and gives the same bytes; a test id added
    later re-solves only its own group. The solver's diagnostics are kept per group; the run
    reports the last group's, as an uninterrupted run does.
    """
    ids = torch.as_tensor(test_ids)
    keys = [f"t{int(i)}-{hash_tensors(test.take(ids[j : j + 1]))[:16]}" for j, i in enumerate(test_ids)]
    buckets: dict[int, list[int]] = {}
    for j, i in enumerate(test_ids.tolist()):
        buckets.setdefault(int(i) // SOLVE_GROUP, []).append(j)
    groups = [buckets[b] for b in sorted(buckets)]
    out: list[np.ndarray | None] = [None] * len(keys)
    infos = dict(section.meta.get("solver_groups", {}))
    todo = []
    for group in groups:
        name = "-".join(keys[j] for j in group)
        rows = [section.load(keys[j]) if keys[j] in section else None for j in group]
        if name in infos and all(r is not None and r.shape == (inf.p,) for r in rows):
            for j, row in zip(group, rows, strict=True):
                out[j] = row
        else:
            todo.append((name, group))
    solved = sum(len(g) for _, g in todo)
    if solved < len(keys):
        log.info("test directions: %d of %d reused from the cache", len(keys) - solved, len(keys))
    if todo:
        with clock("fit"):
            inf.fit()
        # closed (and cleared) on an error too, so the error's message starts a line of its own
        with tqdm(total=solved, desc="inverse HVPs", unit="test", disable=not progress, leave=False) as bar:
            for name, group in todo:
                d = _directions(inf, test, ids[group]).detach().cpu().numpy()  # (g, p)
                for j, row in zip(group, d, strict=True):
                    section.save(keys[j], row)
                    out[j] = row
                # e.g. eigenvalue lists, cut short; listed last, once the group's entries are saved
                infos[name] = jsonable(getattr(inf.solver, "info", {}), limit=20)
                section.set_meta(solver_groups=infos)
                bar.update(len(group))
    last = "-".join(keys[j] for j in groups[-1]) if groups else ""
    info = dict(sorted(infos.get(last, {}).items()))
    if any(
        i.get("converged") is False
        for n, i in infos.items()
        if n in {"-".join(keys[j] for j in g) for g in groups}
    ):
        info["converged"] = False  # some directions come from an accepted unconverged solve
    section.set_meta(solver=info)
    if todo:
        log.info("test directions: solved %d with %s %s", solved, inf.estimator.name, solver_text(info))
    elif info.get("converged") is False:
        log.warning(
            "the cached test directions come from a solve that did not converge %s, accepted with "
            "on_unconverged='warn': the scores are approximate",
            solver_text(info),
        )
    return np.stack(out)  # type: ignore[arg-type]


def _directions(inf: Influence, test: Examples, ids: Tensor) -> Tensor:
    """``inf.test_directions`` of test examples ``ids``; a non-finite gradient is reported by test id
    (the library only knows positions in the batch it was given)."""
    try:
        return inf.test_directions(test.take(ids))
    except NonFiniteError:
        bad = []
        for i in ids.tolist():  # the error path only: find the culprits one by one
            try:
                inf.gradients(test.take(torch.tensor([i])))
            except NonFiniteError:
                bad.append(i)
        if not bad:
            raise
        raise NonFiniteError(
            f"the gradient of the test measurement is NaN or infinite for test example(s) {bad}: check "
            "those inputs, the loss (e.g. log of 0) and the model's weights; use float64 if it overflows"
        ) from None


# A model whose mean training gradient is more than this fraction of a typical example's gradient
# is far from the minimum influence functions assume (a random initialisation gives about 0.4,
# 20 epochs of SGD on a small convex problem 0.03, L-BFGS to the optimum 1e-11).
FAR_FROM_MINIMUM = 0.1


def scores_from_cache(
    inf: Influence, directions: np.ndarray, section: Section, chunk: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Scores ``(m, n)`` from cached training-gradient chunks, computing (and caching) missing ones,
    and how far the model is from a minimum (see :func:`optimality`), from the same gradients.

    Chunk ``c`` holds ``g_i`` for ids ``[c * chunk, (c + 1) * chunk)``, shape ``(c_len, p)``.
    """
    n = inf.n
    starts = list(range(0, n, chunk))
    keys = [f"c{c:06d}" for c in range(len(starts))]
    d = torch.from_numpy(directions).to(inf.theta)
    scores = np.empty((len(directions), n), dtype=np.float64)
    total = torch.zeros(inf.p, dtype=torch.float64)  # sum_i g_i
    norms = 0.0  # sum_i ||g_i||
    missing = []
    for c, key in enumerate(keys):
        stop = min(starts[c] + chunk, n)
        g = section.load(key) if key in section else None
        if g is None or g.shape != (stop - starts[c], inf.p):
            missing.append(c)
            continue
        grads = torch.from_numpy(g)
        scores[:, starts[c] : stop] = _scores(d, grads.to(d), n)
        total += grads.double().sum(0)
        norms += float(grads.double().norm(dim=1).sum())
    if len(missing) < len(keys):
        log.info(
            "training gradients: %d of %d chunks reused from the cache", len(keys) - len(missing), len(keys)
        )
    if missing:
        # Every chunk but the last is full, so the missing ids re-chunk into exactly the missing chunks.
        ids = torch.cat([torch.arange(starts[c], min(starts[c] + chunk, n)) for c in missing])
        for c, (got, g) in zip(missing, inf.train_gradients(ids), strict=True):
            section.save(keys[c], g)
            scores[:, got.numpy()] = _scores(d, g, n)
            total += g.detach().double().cpu().sum(0)
            norms += float(g.detach().double().norm(dim=1).sum())
        log.info("training gradients: computed %d chunks of up to %d examples", len(missing), chunk)
    return scores, optimality(total / n, norms / n)


def optimality(mean_gradient: Tensor, mean_norm: float) -> dict[str, float]:
    """How far ``theta`` is from a minimum of the training objective: the norm of its gradient
    ``mean_i g_i`` ``(p,)`` relative to the mean norm of one example's gradient; warns (in the log,
    hence the summary) above :data:`FAR_FROM_MINIMUM`."""
    return optimality_of_norms(float(mean_gradient.norm()), mean_norm)


def optimality_of_norms(norm: float, mean_norm: float) -> dict[str, float]:
    """:func:`optimality` from the norm of the mean gradient and the mean norm of one example's."""
    ratio = norm / mean_norm if mean_norm > 0 else 0.0
    if ratio > FAR_FROM_MINIMUM:
        log.warning(
            "the model is far from a minimum of its training objective: the gradient of the mean "
            "training loss (plus regulariser) has norm %.3g, %.0f%% of a typical example's gradient "
            "(%.3g). Influence functions assume a minimum, so the scores are less reliable: train to "
            "convergence (e.g. fit the last layer with L-BFGS), or explain the layers that are at one "
            "(--params)",
            norm,
            100 * ratio,
            mean_norm,
        )
    return {"objective_gradient_norm": norm, "mean_example_gradient_norm": mean_norm, "ratio": ratio}


def _scores(directions: Tensor, grads: Tensor, n: int) -> np.ndarray:
    return removal_scores(directions, grads.to(directions), n).double().cpu().numpy()


def solver_text(info: Mapping[str, Any]) -> str:
    """The numbers in a solver's ``info``, e.g. ``"(iterations 112, residual 8.1e-09)"``, and
    ``"NOT CONVERGED"`` for a solve accepted unconverged; "" if none."""
    shown = {k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()]
    if info.get("converged") is False:
        parts.append("NOT CONVERGED")
    return "(" + ", ".join(parts) + ")" if parts else ""
