"""``summary.json``: the run's answer per test example, and what produced it, as plain JSON."""

from __future__ import annotations

from typing import Any

import numpy as np

from influencer.app.job.evaluation import label_text
from influencer.app.job.features import chosen_head
from influencer.app.report.explanation import Explanation, candidates_json
from influencer.app.run.store import jsonable

SIGN_CONVENTION = (
    "score = predicted change of the test loss if the training example were removed and the model "
    "retrained; positive = helpful, negative = harmful"
)


def make_summary(
    ex: Explanation, timings: dict[str, float], files: dict[str, str], warnings: list[str] | None = None
) -> dict[str, Any]:
    """Per test example: label, prediction, the top helpful/harmful ids and scores; then the settings,
    ``timings`` (seconds per stage), the run's ``files`` (role -> file name) and the ``warnings``
    it logged (an approximate solve, a model far from a minimum, ...)."""
    ev, job, inf, config, top = ex.evaluation, ex.job, ex.influence, ex.config, ex.top

    def label(v: Any) -> Any:
        return v.item() if isinstance(v, np.generic) else v

    tests = []
    for j, tid in enumerate(ex.test_ids.tolist()):
        entry: dict[str, Any] = {"test_id": tid}
        if ev.labels is not None:
            entry["label"] = label(ev.labels[tid])
        if ev.predictions is not None:
            entry["prediction"] = label(ev.predictions[tid])
        if job.classes is not None and ev.classification:
            entry["label_name"] = label_text(ev.labels[tid], job.classes) if ev.labels is not None else None
            entry["prediction_name"] = label_text(ev.predictions[tid], job.classes)
        entry["correct"] = ev.correct(tid)
        entry["test_loss"] = float(ev.losses[tid])
        entry["helpful_ids"] = top.helpful_ids[j].tolist()
        entry["helpful_scores"] = top.helpful_scores[j].tolist()
        entry["harmful_ids"] = top.harmful_ids[j].tolist()
        entry["harmful_scores"] = top.harmful_scores[j].tolist()
        tests.append(entry)
    store = ex.scoring
    exact = store is None or store.uses_estimator  # an estimator computed (part of) the scores
    unrolled = ex.ran is not None and ex.ran.method == "unrolled"
    return jsonable(
        {
            "job": job.name,
            "sign_convention": SIGN_CONVENTION,
            "n_train": inf.n,
            "n_test": len(job.test),
            "test_accuracy": ev.accuracy,
            "num_parameters": inf.p,
            "parameters": inf.fn.names,
            "method": config.method,
            "estimator": jsonable(ex.ran.estimator if unrolled else inf.estimator.settings())
            if exact
            else None,
            "curvature": (ex.ran.curvature if ex.ran else config.curvature) if exact else None,
            "damping": ex.ran.damping if ex.ran and exact else None,
            "estimator_reason": ex.ran.reason if ex.ran and exact else None,
            "hessian_examples": (config.hessian_size or inf.n) if exact else None,
            "hessian_sampler": config.hessian_sampler if config.hessian_size and exact else None,
            "dtype": config.dtype,
            "device": str(inf.device),
            "solver": ex.solver,
            "head": chosen_head(config, job),
            "test_selection": ex.test_choice,
            "optimality": ex.optimality,
            **({"scores_from_store": store.settings} if store is not None else {}),
            "warnings": list(warnings or []),
            "tests": tests,
            "candidates_to_inspect": candidates_json(ex.candidates()),
            "candidates_rule": (
                f"training examples among the {top.harmful_ids.shape[1]} most harmful (negative scores) "
                f"of at least {ex.min_recurrence} explained test examples"
            ),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "files": files,
            "settings": config.to_dict(),
            "ran": ex.ran.to_dict() if ex.ran else None,
        }
    )
