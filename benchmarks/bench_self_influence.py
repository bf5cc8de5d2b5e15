"""Self-influence at the sizes users bring: the Kronecker estimators' layer form against solving
every per-example gradient, and against kronfluence's self scores.

Self-influence, ``(1/n) grad loss_i^T H^-1 g_i`` for every training example, is what ranks
mislabelled data (``influencer.uses.mislabels``). For each problem (``bench_estimators.py``'s
names) and method (``kfac``, ``ekfac``) the estimator is fitted once (``fit_s``), then the
self-influence of the first ``--examples`` training examples is timed (``self_s``):

* ``influencer``: ``Influence.self_influence``; with a Kronecker solver, from each batch's layer
  rows: a quadratic form in every layer's eigenbasis, ``d_out d_in`` multiplications per example
  and layer, plus the regulariser's term through one solve (``KroneckerSolver.quadratic_rows``);
* ``influencer-solves``: the same numbers by the general path every other estimator takes,
  per-example gradients ``(c, p)`` and a solve of each (``d_out d_in (d_out + d_in)`` per layer);
* ``kronfluence``: ``Analyzer.compute_self_scores`` with its own fitted factors (the same strategy,
  damping and dtype as in ``bench_estimators.py``; its fit is timed as ``fit_s``).

``rel_err`` is the largest difference of a row's values from ours over ours' largest; kronfluence's
differ by its sampled labels and by leaving out the L2 term, so its agreement is a Pearson
correlation with ours::

    .venv-bench/bin/python benchmarks/bench_self_influence.py --threads 1 --problems mlp-p1e5-n1e4 \\
        --examples 1000 --json out/self_p1e5.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch
from bench_estimators import FULL_PROBLEMS, FULL_SETTINGS, LARGE_PROBLEMS, LARGE_SETTINGS
from common import format_table, machine, make_problem, stopwatch, versions, write_json
from peers import Kronfluence, NotAvailableError, Ours, Resolved

LIBRARIES = ("influencer", "influencer-solves", "kronfluence")


def ours(method: str, problem: Any, r: Resolved, examples: int, solves: bool) -> dict[str, Any]:
    from influencer import Influence

    estimator = Ours().estimator(method, r)
    with stopwatch(problem.device) as fit:
        inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=estimator).fit()
    ids = torch.arange(examples)
    with stopwatch(problem.device) as run:
        values = inf._self_influence_from_gradients(ids) if solves else inf.self_influence(ids)
    return {"fit_s": fit["seconds"], "self_s": run["seconds"], "values": values}


def kronfluence(method: str, problem: Any, r: Resolved, examples: int) -> dict[str, Any]:
    run = Kronfluence().self_scores(method, problem, r, examples)
    return {"fit_s": run.fit_seconds, "self_s": run.score_seconds, "values": run.scores[0] / problem.n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="mlp-p1e5-n1e4")
    parser.add_argument("--methods", default="kfac,ekfac")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--examples", type=int, default=1000, help="training examples scored")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {s.name: s for s in (*FULL_PROBLEMS, *LARGE_PROBLEMS)}
    libraries = args.libraries.split(",")
    if unknown := [w for w in args.problems.split(",") if w not in known] + [
        lib for lib in libraries if lib not in LIBRARIES
    ]:
        parser.error(f"unknown {unknown}; problems: {', '.join(known)}; libraries: {', '.join(LIBRARIES)}")
    env = {
        "machine": machine(torch.device("cpu")),
        "versions": versions(("influencer", "torch", "kronfluence")),
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()), flush=True)
    rows = []
    for name in args.problems.split(","):
        spec = known[name]
        problem = make_problem(spec)
        settings = LARGE_SETTINGS if spec in LARGE_PROBLEMS else FULL_SETTINGS  # as bench_estimators.py
        r = Resolved(settings, float("nan"), 0)
        c = min(args.examples, problem.n)
        for method in args.methods.split(","):
            reference = None
            for lib in libraries:
                try:
                    got = (
                        kronfluence(method, problem, r, c)
                        if lib == "kronfluence"
                        else ours(method, problem, r, c, solves=lib == "influencer-solves")
                    )
                except NotAvailableError:
                    continue
                values = got.pop("values").to(torch.float64)
                reference = values if reference is None else reference
                scale = float(reference.abs().max())
                row = {
                    "problem": name,
                    "p": problem.p,
                    "n": problem.n,
                    "examples": c,
                    "method": method,
                    "library": lib,
                    **got,
                }
                row["rel_err"] = float((values - reference).abs().max()) / scale
                row["pearson"] = float(torch.corrcoef(torch.stack([values, reference]))[0, 1])
                row["speed-up"] = None
                rows.append(row)
                print(
                    f"  {name} {method} {lib}: fit {got['fit_s']:.3g} s, self {got['self_s']:.3g} s",
                    flush=True,
                )
            mine = next(
                (
                    x["self_s"]
                    for x in rows
                    if x["problem"] == name and x["method"] == method and x["library"] == "influencer"
                ),
                None,
            )
            for x in rows:
                if x["problem"] == name and x["method"] == method and mine:
                    x["speed-up"] = x["self_s"] / mine
    header = [
        "problem",
        "p",
        "examples",
        "method",
        "library",
        "fit_s",
        "self_s",
        "self_s / ours",
        "rel_err",
        "pearson",
    ]
    table = [
        [
            x["problem"],
            x["p"],
            x["examples"],
            x["method"],
            x["library"],
            x["fit_s"],
            x["self_s"],
            x["speed-up"],
            x["rel_err"],
            x["pearson"],
        ]
        for x in rows
    ]
    print()
    print(format_table(table, header))
    if args.json:
        write_json(args.json, {**env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
