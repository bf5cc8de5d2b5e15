"""A run's outputs, encoded in full and then written together into the run directory:

``scores.npy`` (rows: the test ids in ``test_ids.npy``), ``test_ids.npy``, ``config.json``,
``influence_vs_distance.png`` (when the inputs can be compared), ``report.html`` and, last,
``summary.json``. Everything is encoded before the first file is written, so a value that cannot be
stored stops the run before it has replaced any earlier output; then the files replace the previous
run's as one set (:meth:`~influencer.app.run.store.RunStore.commit_outputs`). ``summary.json`` lists the
sha256 of every other file, so a reader can check that the files it reads belong together.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from influencer.app.report.build import Report, build_report
from influencer.app.report.explanation import ExplainResult, Explanation
from influencer.app.report.summary import make_summary
from influencer.app.run.logs import Stopwatch
from influencer.app.run.store import RunStore, array_bytes, jsonable

log = logging.getLogger("influencer.explain")

# role -> file name, in the order written (the summary last: it lists the others)
FILES = {
    "scores": "scores.npy",
    "test_ids": "test_ids.npy",
    "config": "config.json",
    "plot": "influence_vs_distance.png",
    "report": "report.html",
    "summary": "summary.json",
}


def output_files(report: Report) -> dict[str, str]:
    """The files a run with this report writes, role -> name."""
    return {role: name for role, name in FILES.items() if role != "plot" or report.figure is not None}


def encode_outputs(ex: Explanation, report: Report, summary: dict[str, Any]) -> dict[str, bytes]:
    """Every output file's bytes, by role (see :data:`FILES`)."""
    dtype = np.float32 if ex.config.dtype == "float32" else np.float64
    contents = {
        "scores": array_bytes(ex.scores.astype(dtype)),
        "test_ids": array_bytes(ex.test_ids),
        "config": (json.dumps(run_settings(ex), indent=2, sort_keys=True) + "\n").encode("utf-8"),
        "plot": report.figure,
        "report": report.html.encode("utf-8"),
    }
    out = {role: data for role, data in contents.items() if data is not None}
    summary = {
        **summary,
        "sha256": {FILES[role]: hashlib.sha256(data).hexdigest() for role, data in out.items()},
    }
    out["summary"] = (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode("utf-8")
    return out


def write_outputs(
    store: RunStore, ex: Explanation, report: Report, summary: dict[str, Any]
) -> dict[str, Path]:
    """Write the run's outputs as one set; returns role -> path."""
    contents = encode_outputs(ex, report, summary)
    paths = store.commit_outputs(
        {FILES[role]: data for role, data in contents.items()}, last=FILES["summary"]
    )
    files = {role: paths[FILES[role]] for role in contents}
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return files


def run_settings(ex: Explanation) -> dict[str, Any]:
    """``config.json``: the settings as requested (defaults, TOML file, flags) and as they ran
    (the estimator, damping, parameters and curvature they resolved to)."""
    return jsonable({"requested": ex.config.to_dict(), "ran": ex.ran.to_dict() if ex.ran else None})


def finish(ex: Explanation, store: RunStore, clock: Stopwatch, warned: list[str]) -> ExplainResult:
    """The report, the summary and the run's files, written as one set; the result to return."""
    with clock("report"):
        report = build_report(ex, store.root)
    clock.stop("total")
    summary = make_summary(ex, clock.timings, output_files(report), warned)
    files = write_outputs(store, ex, report, summary)
    log.info("done in %.1f s", clock.timings["total"])
    accuracy = ex.evaluation.accuracy
    return ExplainResult(
        ex.config, store.root, ex.test_ids, ex.scores, ex.top, accuracy, summary, clock.timings, files
    )
