"""The report's content: the facts about a run, what goes on each test example's panel, the
training examples to inspect, and the influence-vs-distance figure (drawn by
:mod:`influencer.plotting`).

:mod:`influencer.app.report.page` lays the content out as one HTML document; :class:`Gallery` is the one
place that turns examples into HTML, through the job's display (:mod:`influencer.app.report.display`:
pictures, texts, feature tables, or shapes and values).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer.app.job.evaluation import label_text
from influencer.app.job.features import chosen_head
from influencer.app.job.job import Job, labels_of
from influencer.app.report.display import Display, TableDisplay
from influencer.app.report.explanation import Explanation, names_text
from influencer.app.report.page import Card, Panel, render_report
from influencer.app.run.cached import solver_text
from influencer.errors import InfluencerError
from influencer.plotting import figure_png, influence_vs_distance
from influencer.uses.perturbation import PerturbationInfluence, get_input

log = logging.getLogger("influencer.explain")

SETS = ("train", "test")
SAMPLE = 512  # training examples a display is prepared on (e.g. the shared grey range of pictures)


@dataclasses.dataclass(frozen=True)
class Report:
    """The rendered report and its figure."""

    html: str
    figure: bytes | None  # PNG, or None when the inputs cannot be compared


class Gallery:
    """How the report shows examples: :meth:`render` turns examples of either set into HTML."""

    def __init__(self, job: Job, display: Display) -> None:
        self.job = job
        self.display = display

    def render(self, which: str, ids: Tensor, shares: Tensor | None = None) -> list[str]:
        """One HTML fragment per example ``ids`` of the ``"train"`` or ``"test"`` set ("" if the
        display cannot show them: the report then shows ids and labels only). ``shares`` ``(c, d)``:
        each feature's share of the examples' scores, for feature tables."""
        try:
            if shares is not None and isinstance(self.display, TableDisplay):
                return self.display.html(self.job.shown_batch(which, ids), shares)
            return self.display.html(self.job.shown_batch(which, ids))
        except Exception as exc:  # a display that cannot show this data must not lose the run
            log.warning(
                "report: %s cannot show the %s examples (%s)", type(self.display).__name__, which, exc
            )
            return [""] * len(ids)


class Attributions:
    """For feature tables: each training example's features' shares of its score on a test
    example, gradient x input relative to the average training example
    (:class:`~influencer.uses.perturbation.PerturbationInfluence`), so a table lists first the
    features that make the example helpful or harmful. Available when the table shows the
    model's own float inputs and influence was computed on them (not on a head's features)."""

    def __init__(self, ex: Explanation, gallery: Gallery) -> None:
        self.ex = ex
        self.perturbation: PerturbationInfluence | None = None
        self.baseline: Tensor | None = None
        display, job = gallery.display, ex.job
        usable = (
            isinstance(display, TableDisplay)
            and display.importance is None
            and display.key is None
            and ex.directions is not None
            and job.shown is None
            and ex.influence.train is job.train
        )
        if not usable:
            return
        key = getattr(job.task, "input_key", 0)
        try:
            sample = get_input(job.train.take(torch.arange(min(SAMPLE, len(job.train)))), key)
            if not (sample.is_floating_point() and sample.ndim == 2):
                return
            quiet = copy.copy(ex.influence)  # no progress bar per panel
            quiet.progress = False
            self.perturbation = PerturbationInfluence(quiet, input=key)
            self.baseline = sample.double().mean(0)
        except InfluencerError as exc:  # e.g. a model whose inputs are not differentiable
            log.info("report: no feature attribution (%s)", exc)

    @property
    def available(self) -> bool:
        return self.perturbation is not None

    def shares(self, j: int, ids: Tensor) -> Tensor | None:
        """``(c, d)`` shares of training examples ``ids``' scores on the ``j``-th test example."""
        if self.perturbation is None or self.ex.directions is None:
            return None
        d = torch.from_numpy(self.ex.directions[j : j + 1])
        found = self.perturbation.attribution_from_directions(d, ids, self.baseline)
        return found.gradient_x_input[0]


def make_gallery(job: Job) -> Gallery:
    """The job's display, prepared on a sample of its training examples."""
    display = job.chosen_display()
    sample = job.shown_batch("train", torch.arange(min(SAMPLE, len(job.train))))
    try:
        display.prepare(sample)
    except Exception as exc:
        log.warning("report: %s cannot show this data (%s)", type(display).__name__, exc)
    log.info("report: examples shown as %s (%s)", display.kind, type(display).__name__)
    return Gallery(job, display)


@dataclasses.dataclass
class _Survey:
    distances: np.ndarray  # (m, n) input distance from each test example to each training example
    labels: np.ndarray | None  # (n,) training labels


def _survey(gallery: Gallery, test_ids: np.ndarray, batch_size: int) -> _Survey | None:
    """Distances from the test examples to every training example, as the display places them,
    read chunk by chunk; None when the display has no points (e.g. texts)."""
    job, display = gallery.job, gallery.display
    try:
        q = display.points(job.shown_batch("test", torch.as_tensor(test_ids)))
    except Exception:
        q = None
    if q is None:
        return None
    dists, labels = [], []
    for ids, batch in job.train.chunks(max(batch_size, 512)):
        x = display.points(job.shown_batch("train", ids) if job.shown is not None else batch)
        if x is None or x.shape[1] != q.shape[1]:
            return None
        dists.append(torch.cdist(q, x))
        labels.append(labels_of(batch))
    y = torch.cat(labels).cpu().numpy() if all(t is not None for t in labels) else None  # type: ignore[misc]
    return _Survey(torch.cat(dists, dim=1).numpy(), y)


def build_report(ex: Explanation, run_dir: Path) -> Report:
    """The whole report of a run: facts, one panel per test example, the training examples to
    inspect, and the figure."""
    job = ex.job
    gallery = make_gallery(job)
    survey = _survey(gallery, ex.test_ids, ex.config.batch_size)
    figure = _figure(ex, survey) if survey is not None else None
    attributions = Attributions(ex, gallery)
    notes = [
        f"Run directory: {run_dir}. Scores: scores.npy (rows: the test ids in test_ids.npy); "
        "per test example: summary.json."
    ]
    if ex.scoring is not None:
        notes.insert(
            0,
            f"Scores come from the gradient store {ex.scoring.store}: every training gradient was "
            f"projected ({ex.scoring.projection}) and the test directions preconditioned by "
            f"{ex.scoring.preconditioner}. They estimate influence; exact gradients (explain without "
            "--store) can rank differently.",
        )
    if attributions.available:
        notes.insert(
            0,
            "Feature tables of training examples list first the features that carry the example's score "
            "on that test example, with each one's share of it (gradient x input, relative to the average "
            "training example): positive shares make it helpful, negative ones harmful.",
        )
    page = render_report(
        f"influencer explain: {job.name}",
        job.description or "Which training examples are most responsible for these predictions?",
        facts(ex),
        [panel(ex, gallery, j, attributions) for j in range(len(ex.test_ids))],
        figure,
        notes=notes,
        candidates=candidate_cards(ex, gallery),
        candidates_note=candidates_note(ex),
    )
    return Report(page, figure)


def candidates_note(ex: Explanation) -> str:
    """What the "candidates to inspect" list is."""
    m, k = len(ex.test_ids), ex.top.harmful_ids.shape[1]
    if m < 2:
        return "Explain two or more test examples to see which training examples are harmful to several."
    found = ex.candidates()
    head = (
        f"Training examples among the {k} most harmful of at least {ex.min_recurrence} of the {m} explained "
        "test examples, most often first. An example harmful to many predictions is often mislabelled, "
        "ambiguous or unusual: check these first."
    )
    return head if found else head + " None recurs in this run."


def candidate_cards(ex: Explanation, gallery: Gallery) -> list[Card]:
    """One card per training example that recurs among the most harmful (see
    :meth:`Explanation.candidates`)."""
    found = ex.candidates()
    if not found:
        return []
    ids = torch.tensor([c.train_id for c in found])
    visuals = gallery.render("train", ids)
    labels = labels_of(ex.job.train.take(ids))
    cards = []
    for r, c in enumerate(found):
        lines = [f"#{c.train_id}"]
        if labels is not None:
            lines.append(f"label {label_text(labels[r].item(), ex.job.classes)}")
        lines.append(f"harmful to {c.count} of {len(ex.test_ids)}")
        lines.append("tests " + ", ".join(f"#{t}" for t in c.test_ids))
        cards.append(Card(visuals[r], tuple(lines), c.total_score))
    return cards


def _figure(ex: Explanation, survey: _Survey) -> bytes:
    same = None
    ev = ex.evaluation
    if survey.labels is not None and ev.labels is not None and ev.classification:
        same = survey.labels[None, :] == ev.labels[ex.test_ids][:, None]  # (m, n)
    titles = [ex.title(j) for j in range(len(ex.test_ids))]
    return figure_png(influence_vs_distance(survey.distances, ex.scores, titles, same))


def panel(ex: Explanation, gallery: Gallery, j: int, attributions: Attributions | None = None) -> Panel:
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
        shares = attributions.shares(j, ids) if attributions is not None else None
        visuals = gallery.render("train", ids, shares)
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
    head = chosen_head(config, ex.job)
    over = f"{inf.p} parameters ({names_text(inf.fn.names)})"
    if head is not None:
        over += f"; the head {head!r} alone, on the network's features (computed once, cached)"
    common = [
        ("model", ex.job.name),
        ("training examples", str(inf.n)),
        ("test accuracy", f"{100 * ev.accuracy:.2f}%" if ev.accuracy is not None else "n/a"),
        ("test examples", ex.test_choice or "n/a"),
        ("influence over", over),
    ]
    if ex.scoring is not None:
        solver = [("solver", solver_text(ex.solver).strip("()"))] if solver_text(ex.solver) else []
        return [
            *common,
            ("scores", f"projected gradients from the store {ex.scoring.store}: {ex.scoring.projection}"),
            ("preconditioner", ex.scoring.preconditioner),
            *solver,
            ("computed in", config.dtype + " on " + str(inf.device)),
        ]
    ran = ex.ran
    estimator = f"{inf.estimator.name} {_settings_text(inf.estimator.settings())}"
    if ran is not None:
        estimator += f" ({ran.reason})"
    return [
        *common,
        ("method", "influence functions" if config.method == "influence" else config.method),
        ("estimator", estimator),
        ("curvature", (ran.curvature if ran else config.curvature or "hessian") + _hessian_text(ex)),
        ("damping", _damping_text(ran.damping) if ran else "n/a"),
        ("solver", solver_text(ex.solver).strip("()") or "n/a"),
        ("computed in", config.dtype + " on " + str(inf.device)),
    ]


def _damping_text(damping: dict[str, Any]) -> str:
    """The damping that ran, e.g. ``"relative: 0.1 x the mean eigenvalue (0.0032 applied)"``."""
    parts = [damping["kind"]]
    if damping.get("absolute"):
        parts.append(f"{damping['absolute']:.3g} added")
    if damping.get("relative"):
        parts.append(f"{damping['relative']:g} x the mean eigenvalue")
    if damping.get("relative_if_indefinite"):
        parts.append(f"{damping['relative_if_indefinite']:g} x the mean |eigenvalue| if indefinite")
    if "applied" in damping:
        parts.append(f"{damping['applied']:.3g} applied")
    return ", ".join(parts)


def _hessian_text(ex: Explanation) -> str:
    if ex.config.hessian_size is None:
        return ""
    n, sampler = ex.config.hessian_size, ex.config.hessian_sampler
    return f", estimated on {n} of {ex.influence.n} training examples ({sampler} sampler)"


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "estimator")
