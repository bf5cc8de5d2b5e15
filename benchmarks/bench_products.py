"""Curvature products of many vectors, by how many vectors one batched backward pass takes.

The inner step of CG, LiSSA, Arnoldi and the dense build is ``Curvature.matvec`` (every training
example) or ``Curvature.sample_matvec`` (LiSSA's minibatch). Each runs one batched backward pass
per block of vectors: ``vector_batch`` of them, or by default (``auto``) as many as keep the pass's
working set within 32 MiB (its graph and a parameter row per vector). For each problem (the
race's, ``bench_estimators.py``; trained once, float64) this times, at each width:

* ``lissa_step``: one LiSSA minibatch product (32 examples) of ``--vectors`` vectors (default
  1,000), the median of ``--repeats`` after a warm-up;
* ``full``: one product over every training example (in the influence's batches), of the same
  vectors (10 on the ``--large`` problem).

``auto`` needs the automatic width (present code); numeric widths also run on older commits, whose
default was 64, so the same command there measures the code before (see ``benchmarks/README.md``)::

    python benchmarks/bench_products.py --threads 1 --json out/products.json
    python benchmarks/bench_products.py --threads 1 --widths 64 --json out/products_before.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from bench_estimators import FULL_PROBLEMS, LARGE_PROBLEMS
from common import format_table, machine, make_problem, versions, write_json


def timed(run: Any, repeats: int) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(spec: Any, widths: list[str], vectors: int, repeats: int) -> list[dict[str, Any]]:
    from influencer import Influence, LiSSA

    problem = make_problem(spec)
    inf = Influence(problem.fresh_model(), problem.task, problem.train, estimator=LiSSA(scale=10.0)).fit()
    curvature = inf.solver.curvature
    v = torch.randn(vectors, curvature.p, dtype=curvature.dtype, generator=torch.Generator().manual_seed(0))
    rows = []
    for width in widths:
        curvature.vector_batch = None if width == "auto" else int(width)
        gen = torch.Generator().manual_seed(0)
        rows.append(
            {
                "problem": spec.name,
                "p": curvature.p,
                "vectors": vectors,
                "width": width,
                "lissa_step_s": timed(lambda gen=gen: curvature.sample_matvec(v, gen, 32), repeats),
                "full_s": timed(lambda: curvature.matvec(v), max(1, repeats // 10)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="auto,16,64,256", help="comma list: auto or vectors per pass")
    parser.add_argument("--vectors", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20, help="LiSSA steps timed (full products: a tenth)")
    parser.add_argument("--large", action="store_true", help="also mlp-p1e5-n1e4 (10 vectors)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [w for w in args.widths.split(",") if w]
    env = {"machine": machine(torch.device("cpu")), "versions": versions(("influencer", "torch"))}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()), flush=True)
    rows = []
    for spec in FULL_PROBLEMS:
        rows += measure(spec, widths, args.vectors, args.repeats)
    if args.large:
        large = next(s for s in LARGE_PROBLEMS if s.name == "mlp-p1e5-n1e4")
        rows += measure(large, widths, 10, max(2, args.repeats // 4))
    table = [[r["problem"], r["p"], r["vectors"], r["width"], r["lissa_step_s"], r["full_s"]] for r in rows]
    print(format_table(table, ["problem", "p", "vectors", "width", "lissa_step_s", "full_s"], align="lrrrrr"))
    if args.json:
        write_json(args.json, {**env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
