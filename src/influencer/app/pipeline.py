"""The ``influencer explain`` job as a Python function: which training examples explain these predictions?

Usage::

    from influencer.app.config import ExplainConfig
    from influencer.app.pipeline import explain
    result = explain(ExplainConfig(out="runs/digits", test_ids=(3, 17)))
    result.scores            # (n_test, n_train) removal scores, positive = helpful
    result.summary["tests"]  # per test example: label, prediction, top helpful/harmful ids and scores

Steps: build the job (train or load the model), evaluate it on the test set, choose test examples,
solve ``s_test = H^-1 grad loss(test)`` for each, stream training-gradient chunks and dot them with
``s_test``, then write ``scores.npy``, ``summary.json``, ``report.html`` and a plot to the run
directory. Training gradients and ``s_test`` directions are cached there (:mod:`influencer.app.store`)
under fingerprints of the weights, data and settings: a repeated run recomputes nothing, a changed
input is detected and recomputed, and an interrupted run resumes from its finished chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from influencer._kernel.data import Examples, to_device
from influencer._kernel.errors import ConfigError
from influencer._kernel.fingerprint import hash_examples, hash_json, hash_module, hash_tensors
from influencer._kernel.progress import progress_bar
from influencer._kernel.scores import TopK, removal_scores, top_k
from influencer.app.config import ExplainConfig
from influencer.app.jobs import Job, digits_job, inputs_of, labels_of, load_job
from influencer.app.report import Card, ExampleView, Panel, influence_distance_png, render_report
from influencer.app.store import RunStore, Section
from influencer.influence import Influence
from influencer.samplers import SamplerContext

log = logging.getLogger("influencer.explain")

SIGN_CONVENTION = (
    "score = predicted change of the test loss if the training example were removed and the model "
    "retrained; positive = helpful, negative = harmful"
)
# Test directions solved together: one block solve shares its passes over the data, and a run
# interrupted mid-way keeps the groups already finished.
SOLVE_GROUP = 8


@dataclasses.dataclass
class ExplainResult:
    """What :func:`explain` computed; the same is on disk in ``run_dir``."""

    config: ExplainConfig
    run_dir: Path
    test_ids: np.ndarray  # (m,)
    scores: np.ndarray  # (m, n_train)
    top: TopK  # each (m, k)
    accuracy: float | None
    summary: dict[str, Any]
    timings: dict[str, float]
    files: dict[str, Path]


# ---- logging ------------------------------------------------------------------------------------


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _logging(run_dir: Path, console: bool) -> Iterator[None]:
    """Log to ``run_dir/explain.log`` (and the console) for the duration of a run."""
    logger = logging.getLogger("influencer")
    handlers: list[logging.Handler] = []
    file_handler = logging.FileHandler(run_dir / "explain.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    handlers.append(file_handler)
    if console:
        console_handler = _TqdmHandler()
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        console_handler.setLevel(logging.INFO)
        handlers.append(console_handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


class _Stopwatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


# ---- the pipeline ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing clearly a device this machine does not have."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is "
                "False): use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for, but the MPS backend is not available; use cpu")
    return device


def explain(config: ExplainConfig, job: Job | None = None, *, console: bool = True) -> ExplainResult:
    """Run the whole job (see the module docstring); ``job`` overrides ``config.task``."""
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    with RunStore(run_dir) as store, _logging(run_dir, console):
        log.info(
            "influencer explain: run directory %s (%s)",
            run_dir,
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        log.debug("settings: %s", config.to_json())
        return _run(config, job, store, device)


def _run(config: ExplainConfig, job: Job | None, store: RunStore, device: torch.device) -> ExplainResult:
    clock = _Stopwatch(device)
    with clock("total"):
        with clock("build"):
            if job is None:
                job = digits_job(config, store, device) if config.task is None else load_job(config.task)
            job.model.to(device).eval()
        log.info("job: %s; %d training and %d test examples", job.name, len(job.train), len(job.test))

        with clock("evaluate"):
            evaluation = evaluate(job, device, config)
        if evaluation.accuracy is not None:
            log.info(
                "test accuracy: %.2f%% (%d of %d)",
                100 * evaluation.accuracy,
                round(evaluation.accuracy * len(job.test)),
                len(job.test),
            )
        test_ids = choose_test_ids(config, evaluation, len(job.test))
        log.info("explaining test examples %s", test_ids.tolist())

        params = _params(config, job)
        dtype = torch.float64 if config.dtype == "float64" else torch.float32
        estimator = config.make_estimator()
        hessian_ids = choose_hessian_ids(config, job, device)
        inf = Influence(
            job.model,
            job.task,
            job.train,
            estimator=estimator,
            curvature=config.curvature,
            params=params,  # type: ignore[arg-type]
            batch_size=config.batch_size,
            hessian_batch_size=config.hessian_batch_size or job.hessian_batch_size or 512,
            hessian_indices=hessian_ids,
            device=device,
            dtype=dtype,
            progress=config.progress,
        )
        log.info(
            "influence over %d parameters (%s) with %s, %s curvature, damping %g, %s",
            inf.p,
            _names(inf.fn.names),
            estimator.name,
            config.curvature,
            estimator.damping,
            config.dtype,
        )
        common = {
            "model weights": hash_module(job.model),
            "training data": hash_examples(job.train),
        }
        grad_settings = {
            "task": job.task.settings(),
            "params": inf.fn.names,
            "dtype": config.dtype,
            "chunk": config.batch_size,
        }
        solve_settings = {
            **grad_settings,
            "estimator": estimator.settings(),
            "curvature": config.curvature,
            "hessian_examples": _hessian_examples(config, hessian_ids),
        }
        solve_settings.pop("chunk")

        with clock("directions"):
            directions_section = store.section(
                "directions", {**common, "settings": hash_json(solve_settings)}, solve_settings
            )
            directions = test_directions(inf, job.test, test_ids, directions_section, config.progress, clock)
        with clock("gradients"):
            grads_section = store.section(
                "gradients", {**common, "settings": hash_json(grad_settings)}, grad_settings
            )
            scores = scores_from_cache(inf, directions, grads_section, config.batch_size)  # (m, n)

        top = top_k(torch.from_numpy(scores), config.top_k)
        for j, tid in enumerate(test_ids.tolist()):
            log.info("test #%d (%s):", tid, evaluation.describe(tid, job.classes))
            log.info("  Most helpful IDs: %s", top.helpful_ids[j].tolist())
            log.info("    scores: %s", _fmt(top.helpful_scores[j]))
            log.info("  Most harmful IDs: %s", top.harmful_ids[j].tolist())
            log.info("    scores: %s", _fmt(top.harmful_scores[j]))

        with clock("report"):
            files = write_outputs(
                store, config, job, inf, evaluation, test_ids, scores, top, directions_section
            )
    summary = _summary(config, job, inf, evaluation, test_ids, top, directions_section, clock.timings, files)
    files["summary"] = store.write_json("summary.json", summary)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    log.info("done in %.1f s", clock.timings["total"])
    return ExplainResult(
        config, store.root, test_ids, scores, top, evaluation.accuracy, summary, clock.timings, files
    )


def _params(config: ExplainConfig, job: Job) -> list[str] | None:
    if config.params is None:
        return list(job.params) if job.params is not None else None
    return None if config.params == ("all",) else list(config.params)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)} tensors)"


def _fmt(values: Tensor) -> str:
    return "[" + ", ".join(f"{float(v):+.3e}" for v in values) + "]"


# ---- evaluation and choice of test examples -------------------------------------------------------


@dataclasses.dataclass
class Evaluation:
    """The model on the whole test set: labels, predictions and losses, each ``(n_test,)``."""

    labels: np.ndarray | None
    predictions: np.ndarray | None
    losses: np.ndarray
    accuracy: float | None
    classification: bool

    def correct(self, i: int) -> bool | None:
        if self.labels is None or self.predictions is None or not self.classification:
            return None
        return bool(self.labels[i] == self.predictions[i])

    def describe(self, i: int, classes: Any = None) -> str:
        parts = []
        if self.labels is not None:
            parts.append(f"label {_label_text(self.labels[i], classes)}")
        if self.predictions is not None:
            parts.append(f"predicted {_label_text(self.predictions[i], classes)}")
        ok = self.correct(i)
        if ok is not None:
            parts.append("correct" if ok else "wrong")
        parts.append(f"loss {self.losses[i]:.3g}")
        return ", ".join(parts)


def _label_text(value: Any, classes: Any) -> str:
    if isinstance(value, (np.integer, int)) and classes is not None and 0 <= int(value) < len(classes):
        return str(classes[int(value)])
    if isinstance(value, (np.floating, float)):
        return f"{float(value):.4g}"
    return str(value)


def evaluate(job: Job, device: torch.device, config: ExplainConfig) -> Evaluation:
    """Predictions and per-example losses on the test set, chunk by chunk."""
    model, task = job.model, job.task
    dtype = next(model.parameters()).dtype
    labels, preds, losses = [], [], []
    with_outputs = True
    chunks = job.test.chunks(config.batch_size)
    total = -(-len(job.test) // config.batch_size)
    with torch.no_grad():
        for _, batch in progress_bar(
            chunks, "evaluating", config.progress and total > 4, total=total, unit="batch"
        ):
            batch = to_device(batch, device, dtype)
            losses.append(task.loss(model, batch).double().cpu())
            y = labels_of(batch)
            labels.append(y.cpu() if y is not None else None)
            if with_outputs:
                try:
                    out = task.outputs(model, batch)
                except Exception:  # a task that overrides loss() may have no usable outputs()
                    with_outputs = False
                    continue
                preds.append(out.detach().cpu())
    loss = torch.cat(losses).numpy()
    y = torch.cat(labels).numpy() if all(t is not None for t in labels) else None
    if not with_outputs or not preds:
        return Evaluation(y, None, loss, None, False)
    out = torch.cat(preds)
    integer_labels = y is not None and np.issubdtype(y.dtype, np.integer)
    if out.ndim == 2 and out.shape[1] > 1 and integer_labels:
        pred = out.argmax(1).numpy()
    elif out.numel() == len(out) and integer_labels and set(np.unique(y).tolist()) <= {-1, 1}:
        pred = np.where(out.reshape(-1).numpy() >= 0, 1, -1)  # one score per example, labels +-1
    elif out.numel() == len(out):
        return Evaluation(y, out.reshape(-1).double().numpy(), loss, None, False)  # regression
    else:
        return Evaluation(y, None, loss, None, False)
    accuracy = float((pred == y).mean()) if y is not None else None
    return Evaluation(y, pred, loss, accuracy, True)


def choose_hessian_ids(config: ExplainConfig, job: Job, device: torch.device) -> Tensor | None:
    """Training ids ``(hessian_size,)`` the curvature is estimated on, or None for all of them."""
    if config.hessian_size is None:
        return None
    if config.hessian_size > len(job.train):
        raise ConfigError(
            f"hessian_size {config.hessian_size} is more than the {len(job.train)} training examples; "
            "lower it, or leave it unset to use them all"
        )
    context = SamplerContext(job.model, job.task, job.train, device=device, batch_size=config.batch_size)
    ids = config.make_sampler().select(context, config.hessian_size, seed=config.seed)
    log.info(
        "curvature estimated on %d of %d training examples (%s sampler, seed %d)",
        len(ids),
        len(job.train),
        config.hessian_sampler,
        config.seed,
    )
    return ids


def _hessian_examples(config: ExplainConfig, ids: Tensor | None) -> dict[str, Any] | str:
    """What the curvature was estimated on, for the cache fingerprint and the report."""
    if ids is None:
        return "all"
    return {"sampler": config.hessian_sampler, "seed": config.seed, "ids": hash_json(ids.tolist())}


def choose_test_ids(config: ExplainConfig, evaluation: Evaluation, n_test: int) -> np.ndarray:
    """``config.test_ids``, or: up to half misclassified (highest loss first), the rest correct,
    spread over different labels (highest-loss and random picks when there are no classes)."""
    if config.test_ids is not None:
        bad = [i for i in config.test_ids if i >= n_test]
        if bad:
            raise ConfigError(
                f"test_ids {bad} are out of range: the test set has {n_test} examples (0..{n_test - 1})"
            )
        return np.asarray(config.test_ids, dtype=np.int64)
    k = min(config.num_test, n_test)
    rng = np.random.default_rng(config.seed)
    if evaluation.classification and evaluation.labels is not None and evaluation.predictions is not None:
        wrong = np.flatnonzero(evaluation.labels != evaluation.predictions)
        wrong = wrong[np.argsort(-evaluation.losses[wrong], kind="stable")][: k // 2]
        right = rng.permutation(np.flatnonzero(evaluation.labels == evaluation.predictions))
        chosen, seen = list(wrong), set(evaluation.labels[wrong].tolist())
        for i in right:  # one per label first, then any
            if len(chosen) < k and evaluation.labels[i] not in seen:
                chosen.append(int(i))
                seen.add(evaluation.labels[i])
        chosen += [int(i) for i in right if int(i) not in chosen][: k - len(chosen)]
    else:
        high = np.argsort(-evaluation.losses, kind="stable")[: k // 2]
        rest = [int(i) for i in rng.permutation(n_test) if i not in set(high.tolist())]
        chosen = list(high) + rest[: k - len(high)]
    return np.asarray(chosen[:k], dtype=np.int64)


# ---- cached computation -----------------------------------------------------------------------------


def test_directions(
    inf: Influence, test: Examples, test_ids: np.ndarray, section: Section, progress: bool, clock: _Stopwatch
) -> np.ndarray:
    """``s_test = H^-1 grad f(z_test)`` for each chosen test example ``(m, p)``, from the cache or solved.

    Entries are keyed by test id and a fingerprint of that example's data, so a changed test set
    is never served stale directions.
    """
    ids = torch.as_tensor(test_ids)
    keys = [f"t{int(i)}-{hash_tensors(test.take(ids[j : j + 1]))[:16]}" for j, i in enumerate(test_ids)]
    out: list[np.ndarray | None] = [None] * len(keys)
    for j, key in enumerate(keys):
        if key in section:
            arr = section.load(key)
            if arr is not None and arr.shape == (inf.p,):
                out[j] = arr
    missing = [j for j, a in enumerate(out) if a is None]
    if len(missing) < len(keys):
        log.info("test directions: %d of %d reused from the cache", len(keys) - len(missing), len(keys))
    if missing:
        with clock("fit"):
            inf.fit()
        bar = tqdm(total=len(missing), desc="inverse HVPs", unit="test", disable=not progress, leave=False)
        for start in range(0, len(missing), SOLVE_GROUP):
            group = missing[start : start + SOLVE_GROUP]
            d = inf.test_directions(test.take(ids[group])).detach().cpu().numpy()  # (g, p)
            for j, row in zip(group, d, strict=True):
                section.save(keys[j], row)
                out[j] = row
            bar.update(len(group))
        bar.close()
        info = _jsonable(getattr(inf.solver, "info", {}), limit=20)  # e.g. eigenvalue lists, cut short
        section.set_meta(solver=info)
        log.info("test directions: solved %d with %s %s", len(missing), inf.estimator.name, _info(info))
    return np.stack(out)  # type: ignore[arg-type]


def scores_from_cache(inf: Influence, directions: np.ndarray, section: Section, chunk: int) -> np.ndarray:
    """Scores ``(m, n)`` from cached training-gradient chunks, computing (and caching) missing ones.

    Chunk ``c`` holds ``g_i`` for ids ``[c * chunk, (c + 1) * chunk)``, shape ``(c_len, p)``.
    """
    n = inf.n
    starts = list(range(0, n, chunk))
    keys = [f"c{c:06d}" for c in range(len(starts))]
    d = torch.from_numpy(directions).to(inf.theta)
    scores = np.empty((len(directions), n), dtype=np.float64)
    missing = []
    for c, key in enumerate(keys):
        stop = min(starts[c] + chunk, n)
        g = section.load(key) if key in section else None
        if g is None or g.shape != (stop - starts[c], inf.p):
            missing.append(c)
            continue
        scores[:, starts[c] : stop] = _scores(d, torch.from_numpy(g).to(d), n)
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
        log.info("training gradients: computed %d chunks of up to %d examples", len(missing), chunk)
    return scores


def _scores(directions: Tensor, grads: Tensor, n: int) -> np.ndarray:
    return removal_scores(directions, grads.to(directions), n).double().cpu().numpy()


def _info(info: dict[str, Any]) -> str:
    shown = {k: v for k, v in info.items() if isinstance(v, (int, float))}
    return (
        "("
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        + ")"
        if shown
        else ""
    )


def _jsonable(obj: Any, limit: int | None = None) -> Any:
    """Plain JSON values (non-finite floats as strings); lists cut to ``limit`` items if given."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, limit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, limit) for v in (obj if limit is None else obj[:limit])]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


# ---- outputs ------------------------------------------------------------------------------------


def _shown(job: Job, which: int, ids: Tensor, batch: Any) -> Tensor | None:
    """The inputs ``(c, ...)`` to draw for examples ``ids`` of the training (0) or test (1) set."""
    if job.display is not None:
        return job.display[which][ids.cpu()]
    return inputs_of(batch)


def _train_view(
    job: Job, test_inputs: Tensor, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None, Tensor] | None:
    """Input distances ``(m, n)`` from each test example to every training example, training labels
    ``(n,)`` (or None), and a sample of training inputs (for the picture range); None when the
    inputs cannot be found in the batches."""
    q = test_inputs.reshape(len(test_inputs), -1).double().cpu()
    dists, labels, sample = [], [], None
    for ids, batch in job.train.chunks(max(batch_size, 512)):
        x = _shown(job, 0, ids, batch)
        if x is None:
            return None
        if sample is None:
            sample = x[:512].cpu()
        dists.append(torch.cdist(q, x.reshape(len(x), -1).double().cpu()))
        labels.append(labels_of(batch))
    y = torch.cat(labels).cpu().numpy() if all(t is not None for t in labels) else None
    return torch.cat(dists, dim=1).numpy(), y, sample  # type: ignore[return-value]


def write_outputs(
    store: RunStore,
    config: ExplainConfig,
    job: Job,
    inf: Influence,
    evaluation: Evaluation,
    test_ids: np.ndarray,
    scores: np.ndarray,
    top: TopK,
    directions: Section,
) -> dict[str, Path]:
    files = {
        "scores": store.write_array(
            "scores.npy", scores.astype(np.float32 if config.dtype == "float32" else np.float64)
        ),
        "test_ids": store.write_array("test_ids.npy", test_ids),
        "config": store.write_text("config.json", config.to_json() + "\n"),
    }
    test_idx = torch.as_tensor(test_ids)
    test_inputs = _shown(job, 1, test_idx, job.test.take(test_idx))
    view = _train_view(job, test_inputs, config.batch_size) if test_inputs is not None else None
    if view is None:
        log.warning("report: cannot find the inputs in the batches to draw them; the report shows ids only")
        test_inputs = None
    dists, train_labels, sample = view if view is not None else (None, None, None)
    titles = [f"test #{i} ({evaluation.describe(int(i), job.classes).split(', loss')[0]})" for i in test_ids]
    plot = None
    if dists is not None:
        same = None
        if train_labels is not None and evaluation.labels is not None and evaluation.classification:
            same = train_labels[None, :] == evaluation.labels[test_ids][:, None]  # (m, n)
        plot = influence_distance_png(dists, scores, titles, same)
        files["plot"] = store.write_bytes("influence_vs_distance.png", plot)

    painter = ExampleView(sample, job.feature_names, job.invert_images) if sample is not None else None

    def visual(x: Tensor | None, alt: str) -> str:
        return painter.html(x, alt) if painter is not None and x is not None else ""

    panels = []
    for j, tid in enumerate(test_ids.tolist()):
        lines = [f"test #{tid}"]
        if evaluation.labels is not None:
            lines.append(f"label: {_label_text(evaluation.labels[tid], job.classes)}")
        if evaluation.predictions is not None:
            lines.append(f"predicted: {_label_text(evaluation.predictions[tid], job.classes)}")
        lines.append(f"test loss: {evaluation.losses[tid]:.3g}")
        test_card = Card(
            visual(test_inputs[j] if test_inputs is not None else None, f"test {tid}"), tuple(lines)
        )
        rows = []
        for ids, vals in (
            (top.helpful_ids[j], top.helpful_scores[j]),
            (top.harmful_ids[j], top.harmful_scores[j]),
        ):
            batch = job.train.take(ids)
            xs, ys = _shown(job, 0, ids, batch) if view is not None else None, labels_of(batch)
            rows.append(
                tuple(
                    Card(
                        visual(xs[r] if xs is not None else None, f"train {int(i)}"),
                        (f"#{int(i)}",)
                        + ((f"label {_label_text(ys[r].item(), job.classes)}",) if ys is not None else ()),
                        float(v),
                    )
                    for r, (i, v) in enumerate(zip(ids.tolist(), vals.tolist(), strict=True))
                )
            )
        panels.append(Panel(test_card, evaluation.correct(tid), rows[0], rows[1]))

    facts = [
        ("model", job.name),
        ("training examples", str(inf.n)),
        ("test accuracy", f"{100 * evaluation.accuracy:.2f}%" if evaluation.accuracy is not None else "n/a"),
        ("influence over", f"{inf.p} parameters ({_names(inf.fn.names)})"),
        ("estimator", f"{inf.estimator.name} {_settings_text(inf.estimator.settings())}"),
        ("curvature", config.curvature + _hessian_text(config, inf)),
        ("solver", _info(directions.meta.get("solver", {})).strip("()") or "n/a"),
        ("computed in", config.dtype + " on " + str(inf.device)),
    ]
    page = render_report(
        f"influencer explain: {job.name}",
        job.description or "Which training examples are most responsible for these predictions?",
        facts,
        panels,
        plot,
        notes=[
            f"Run directory: {store.root}. Scores: scores.npy (rows: the test ids in test_ids.npy); "
            "per test example: summary.json."
        ],
    )
    files["report"] = store.write_text("report.html", page)
    return files


def _hessian_text(config: ExplainConfig, inf: Influence) -> str:
    if config.hessian_size is None:
        return ""
    n, sampler = config.hessian_size, config.hessian_sampler
    return f", estimated on {n} of {inf.n} training examples ({sampler} sampler)"


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "estimator")


def _summary(
    config: ExplainConfig,
    job: Job,
    inf: Influence,
    evaluation: Evaluation,
    test_ids: np.ndarray,
    top: TopK,
    directions: Section,
    timings: dict[str, float],
    files: dict[str, Path],
) -> dict[str, Any]:
    def label(v: Any) -> Any:
        return v.item() if isinstance(v, np.generic) else v

    tests = []
    for j, tid in enumerate(test_ids.tolist()):
        entry: dict[str, Any] = {"test_id": tid}
        if evaluation.labels is not None:
            entry["label"] = label(evaluation.labels[tid])
        if evaluation.predictions is not None:
            entry["prediction"] = label(evaluation.predictions[tid])
        if job.classes is not None and evaluation.classification:
            entry["label_name"] = (
                _label_text(evaluation.labels[tid], job.classes) if evaluation.labels is not None else None
            )
            entry["prediction_name"] = _label_text(evaluation.predictions[tid], job.classes)
        entry["correct"] = evaluation.correct(tid)
        entry["test_loss"] = float(evaluation.losses[tid])
        entry["helpful_ids"] = top.helpful_ids[j].tolist()
        entry["helpful_scores"] = top.helpful_scores[j].tolist()
        entry["harmful_ids"] = top.harmful_ids[j].tolist()
        entry["harmful_scores"] = top.harmful_scores[j].tolist()
        tests.append(entry)
    return _jsonable(
        {
            "job": job.name,
            "sign_convention": SIGN_CONVENTION,
            "n_train": inf.n,
            "n_test": len(job.test),
            "test_accuracy": evaluation.accuracy,
            "num_parameters": inf.p,
            "parameters": inf.fn.names,
            "estimator": _jsonable(inf.estimator.settings()),
            "curvature": config.curvature,
            "hessian_examples": config.hessian_size or inf.n,
            "hessian_sampler": config.hessian_sampler if config.hessian_size else None,
            "dtype": config.dtype,
            "device": str(inf.device),
            "solver": _jsonable(directions.meta.get("solver", {})),
            "tests": tests,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "files": {k: p.name for k, p in files.items()},
            "settings": config.to_dict(),
        }
    )
