"""The report's content: the facts about a run, what goes on each test example's panel, and the
influence-vs-distance figure (drawn by :mod:`influencer.paper.plotting`).

:mod:`influencer.app.page` lays the content out as one HTML document; :class:`Gallery` is the one
place that turns an example into HTML (a picture for images, a feature table otherwise).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer.app.cached import solver_text
from influencer.app.evaluation import label_text
from influencer.app.explanation import Explanation, names_text
from influencer.app.jobs import Job, inputs_of, labels_of
from influencer.app.page import Card, Panel, render_report
from influencer.app.pictures import ExampleView
from influencer.paper.plotting import figure_png, influence_vs_distance

log = logging.getLogger("influencer.explain")

SETS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Report:
    """The rendered report and its figure."""

    html: str
    figure: bytes | None  # PNG, or None when the inputs cannot be compared


def shown_inputs(job: Job, which: str, ids: Tensor) -> Tensor | None:
    """The inputs ``(c, ...)`` a person should see for examples ``ids`` of the ``"train"`` or
    ``"test"`` set: the job's ``display`` inputs, else the inputs of the data (None if not found)."""
    if job.display is not None:
        return job.display[SETS.index(which)][ids.cpu()]
    data = job.train if which == "train" else job.test
    return inputs_of(data.take(ids))


class Gallery:
    """How the report shows examples: :meth:`render` turns examples of either set into HTML."""

    def __init__(self, job: Job, view: ExampleView | None) -> None:
        self.job = job
        self.view = view

    def render(self, which: str, ids: Tensor) -> list[str]:
        """One HTML fragment per example ``ids`` of the ``"train"`` or ``"test"`` set ("" if not drawable)."""
        if self.view is None:
            return [""] * len(ids)
        x = shown_inputs(self.job, which, ids)
        if x is None:
            return [""] * len(ids)
        return [self.view.html(x[r], f"{which} {int(i)}") for r, i in enumerate(ids.tolist())]


@dataclasses.dataclass
class _Survey:
    distances: np.ndarray  # (m, n) input distance from each test example to each training example
    labels: np.ndarray | None  # (n,) training labels
    sample: Tensor  # (<=512, ...) training inputs, for the shared picture range


def _survey(job: Job, test_inputs: Tensor, batch_size: int) -> _Survey | None:
    """Distances from the test inputs ``(m, ...)`` to every training input, read chunk by chunk;
    None when the training inputs cannot be found in the batches."""
    q = test_inputs.reshape(len(test_inputs), -1).double().cpu()
    dists, labels, sample = [], [], None
    for ids, batch in job.train.chunks(max(batch_size, 512)):
        x = job.display[0][ids.cpu()] if job.display is not None else inputs_of(batch)
        if x is None:
            return None
        if sample is None:
            sample = x[:512].cpu()
        dists.append(torch.cdist(q, x.reshape(len(x), -1).double().cpu()))
        labels.append(labels_of(batch))
    y = torch.cat(labels).cpu().numpy() if all(t is not None for t in labels) else None
    return _Survey(torch.cat(dists, dim=1).numpy(), y, sample)  # type: ignore[arg-type]


def build_report(ex: Explanation, run_dir: Path) -> Report:
    """The whole report of a run: facts, one panel per test example, and the figure."""
    job = ex.job
    test_inputs = shown_inputs(job, "test", torch.as_tensor(ex.test_ids))
    survey = _survey(job, test_inputs, ex.config.batch_size) if test_inputs is not None else None
    if survey is None:
        log.warning("report: cannot find the inputs in the batches to draw them; the report shows ids only")
    view = ExampleView(survey.sample, job.feature_names, job.invert_images) if survey is not None else None
    gallery = Gallery(job, view)
    figure = _figure(ex, survey) if survey is not None else None
    page = render_report(
        f"influencer explain: {job.name}",
        job.description or "Which training examples are most responsible for these predictions?",
        facts(ex),
        [panel(ex, gallery, j) for j in range(len(ex.test_ids))],
        figure,
        notes=[
            f"Run directory: {run_dir}. Scores: scores.npy (rows: the test ids in test_ids.npy); "
            "per test example: summary.json."
        ],
    )
    return Report(page, figure)


def _figure(ex: Explanation, survey: _Survey) -> bytes:
    same = None
    ev = ex.evaluation
    if survey.labels is not None and ev.labels is not None and ev.classification:
        same = survey.labels[None, :] == ev.labels[ex.test_ids][:, None]  # (m, n)
    titles = [ex.title(j) for j in range(len(ex.test_ids))]
    return figure_png(influence_vs_distance(survey.distances, ex.scores, titles, same))


def panel(ex: Explanation, gallery: Gallery, j: int) -> Panel:
    """The ``j``-th test example beside its most helpful and most harmful training examples."""
    job, ev = ex.job, ex.evaluation
    tid = int(ex.test_ids[j])
    lines = [f"test #{tid}"]
    if ev.labels is not None:
        lines.append(f"label: {label_text(ev.labels[tid], job.classes)}")
    if ev.predictions is not None:
        lines.append(f"predicted: {label_text(ev.predictions[tid], job.classes)}")
    lines.append(f"test loss: {ev.losses[tid]:.3g}")
    test_card = Card(gallery.render("test", torch.tensor([tid]))[0], tuple(lines))
    rows = []
    for ids, values in (
        (ex.top.helpful_ids[j], ex.top.helpful_scores[j]),
        (ex.top.harmful_ids[j], ex.top.harmful_scores[j]),
    ):
        visuals = gallery.render("train", ids)
        labels = labels_of(job.train.take(ids))
        cards = []
        for r, (i, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True)):
            caption = (f"#{i}",)
            if labels is not None:
                caption += (f"label {label_text(labels[r].item(), job.classes)}",)
            cards.append(Card(visuals[r], caption, float(v)))
        rows.append(tuple(cards))
    return Panel(test_card, ev.correct(tid), rows[0], rows[1])


def facts(ex: Explanation) -> list[tuple[str, str]]:
    """The run in a few lines: model, data, accuracy, and how influence was computed."""
    inf, config, ev = ex.influence, ex.config, ex.evaluation
    return [
        ("model", ex.job.name),
        ("training examples", str(inf.n)),
        ("test accuracy", f"{100 * ev.accuracy:.2f}%" if ev.accuracy is not None else "n/a"),
        ("influence over", f"{inf.p} parameters ({names_text(inf.fn.names)})"),
        ("estimator", f"{inf.estimator.name} {_settings_text(inf.estimator.settings())}"),
        ("curvature", config.curvature + _hessian_text(ex)),
        ("solver", solver_text(ex.solver).strip("()") or "n/a"),
        ("computed in", config.dtype + " on " + str(inf.device)),
    ]


def _hessian_text(ex: Explanation) -> str:
    if ex.config.hessian_size is None:
        return ""
    n, sampler = ex.config.hessian_size, ex.config.hessian_sampler
    return f", estimated on {n} of {ex.influence.n} training examples ({sampler} sampler)"


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "estimator")
