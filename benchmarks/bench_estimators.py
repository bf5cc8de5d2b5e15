"""Every influence estimator in influencer vs every peer that has it, on the same problems, one run.

For each problem (a float64 model trained to the optimum of mean cross-entropy + L2), every
library computes influence scores of all training points on the same test points with the same
hyperparameters, in the same precision (``--dtype``). Reported per (problem, method, library):

* ``fit_s``: the stage that does not depend on the test points (curvature, factors, gradient store);
* ``score_s``: test gradients, inverse-HVPs and the products with every training gradient;
* ``time_s`` = ``fit_s + score_s`` (the library's own setup included, training excluded);
* ``ratio``: ``time_s`` / influencer's ``time_s`` for the same method (> 1: slower than ours);
* ``pearson``, ``spearman``, ``rel_err``: agreement of the scores, mapped to our convention (see
  ``peers.py``), with OUR exact float64 scores over all ``n_test x n_train`` pairs;
* ``rel_ours``: relative difference from influencer's scores for the same method (for
  ``identity-proj``: from ours' exact gradient dot product), which checks each mapping.

Run inside the benchmark environment (``bash benchmarks/setup.sh``)::

    .venv-bench/bin/python benchmarks/bench_estimators.py            # full run, CPU
    .venv-bench/bin/python benchmarks/bench_estimators.py --quick    # smoke run, a few minutes
    .venv-bench/bin/python benchmarks/bench_estimators.py --dtype float32
    .venv-bench/bin/python benchmarks/bench_estimators.py --device cuda --json out/bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri and pyDVL draw progress bars by default

import torch
from common import (
    Problem,
    ProblemSpec,
    agreement,
    format_table,
    machine,
    make_problem,
    versions,
    write_json,
)
from peers import (
    LIBRARIES,
    METHODS,
    NOTES,
    OURS_COUNTERPART,
    NotAvailableError,
    Ours,
    Resolved,
    Run,
    Settings,
    chosen,
    largest_eigenvalue_bound,
    preload,
)

FULL_PROBLEMS = (
    ProblemSpec("logreg-digits", hidden=(), weight_decay=1e-3, n_test=10),
    ProblemSpec("mlp-digits", hidden=(32,), weight_decay=1e-2, n_test=10),
    ProblemSpec("mlp-mnist1d", dataset="mnist1d", hidden=(32,), weight_decay=1e-2, n_test=10),
)
# The sizes users bring: synthetic data (see common.synthetic_data), p ~ 1e4-1e6 and n ~ 1e4-5e4.
# Too large for a dense Hessian (no exact rows, no exact reference: agreement is rel_ours alone).
LARGE_PROBLEMS = (
    ProblemSpec(
        "mlp-p1e4-n1e4", dataset="synthetic", features=64, hidden=(128,), n_train=10_000,
        weight_decay=1e-3, adam_epochs=5, polish=False,
    ),  # p = 9,610
    ProblemSpec(
        "mlp-p1e5-n1e4", dataset="synthetic", features=128, hidden=(256, 256), n_train=10_000,
        weight_decay=1e-3, adam_epochs=3, polish=False,
    ),  # p = 101,386
    ProblemSpec(
        "mlp-p1e5-n5e4", dataset="synthetic", features=128, hidden=(256, 256), n_train=50_000,
        weight_decay=1e-3, adam_epochs=2, polish=False,
    ),  # p = 101,386
    ProblemSpec(
        "mlp-p1e6-n5e4", dataset="synthetic", features=512, hidden=(768, 768), n_train=50_000,
        weight_decay=1e-3, adam_epochs=1, polish=False,
    ),  # p = 992,266
)  # fmt: skip
DENSE_MAX_P = 20_000  # exact rows and the exact reference only up to this many parameters
QUICK_PROBLEMS = (
    ProblemSpec("logreg-digits-300", hidden=(), weight_decay=1e-3, n_train=300, n_test=4),
    ProblemSpec("mlp-mnist1d-300", dataset="mnist1d", hidden=(16,), weight_decay=1e-2, n_train=300, n_test=4),
)
FULL_SETTINGS = Settings()
# At p ~ 1e4-1e6 on CPU, CG at damping 1e-3 and tol 1e-8 takes hundreds of data passes per race:
# the large problems race at damping 1e-2 and tol 1e-6 (the same for every library).
LARGE_SETTINGS = Settings(damping=1e-2, cg_tol=1e-6, cg_max_iter=300, lissa_depth=200)
QUICK_SETTINGS = Settings(lissa_depth=100, arnoldi_rank=20, arnoldi_iterations=40, projection_dim=8)
PACKAGES = ("influencer", "torch", "captum", "dattri", "pyDVL", "kronfluence", "bergson")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class TooLargeError(NotAvailableError):
    """The method needs a dense ``p x p`` Hessian, which this problem is too large for."""


def describe_error(exc: BaseException) -> str:
    """``Type: message``, or ``Type in file:function`` when the message is empty."""
    text = str(exc).strip()
    if not text:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"in {'/'.join(frame.filename.split('/')[-2:])}:{frame.name}"
    return f"{type(exc).__name__}: {text}"[:300]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# Short rows repeat until they have run this long in all (at most MAX_REPEATS times), as timeit's
# autorange does: the best of 3 runs of 20 ms is mostly the machine's noise.
MIN_TOTAL_SECONDS = 1.0
MAX_REPEATS = 30


class RowTimeoutError(BaseException):
    """A row ran past ``--timeout-s``: recorded as a lower bound on its time, not run to the end.

    A ``BaseException``, so that no library's ``except Exception`` can swallow it."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`RowTimeoutError` in the block after ``seconds`` of wall time (SIGALRM; checked
    between Python operations, so one long native call finishes first). None: no limit."""
    if not seconds:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise RowTimeoutError(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def best_of(repeats: int, run: Callable[[], Run], timeout: float | None = None) -> Run:
    """The fastest of at least ``repeats`` runs (timeit's rule: slower runs measure the machine, not
    the code), repeated up to ``MAX_REPEATS`` times until they total ``MIN_TOTAL_SECONDS``.

    With ``timeout``, a run in flight at that many seconds is stopped: the best finished run counts,
    or :class:`RowTimeoutError` when none finished."""
    runs: list[Run] = []
    try:
        with time_limit(timeout):
            while len(runs) < repeats or (
                len(runs) < MAX_REPEATS and sum(r.seconds for r in runs) < MIN_TOTAL_SECONDS
            ):
                runs.append(run())
    except RowTimeoutError:
        if not runs:
            raise
    return min(runs, key=lambda r: r.seconds)


def run_problem(
    problem: Problem,
    settings: Settings,
    methods: list[str],
    libraries: list[str],
    dtype: torch.dtype,
    repeats: int = 1,
    timeout: float | None = None,
) -> tuple[dict, list[dict]]:
    """All (method, library) rows for one problem; ours first, since peers reuse what it found.

    The reference (our exact scores) is always computed in float64; the rows run on the problem
    cast to ``dtype``. Every row's time is the best of ``repeats`` runs; a row still running after
    ``timeout`` seconds (all its repeats together) is stopped and recorded as ``timeout``.
    """
    ours = Ours()
    dense = problem.p <= DENSE_MAX_P
    if dense:
        ref_run = ours.run("exact", problem, Resolved(settings, 1.0, 1))
        reference, exact_info = ref_run.scores, ours.last_info
    else:  # no dense Hessian: the largest eigenvalue (for LiSSA's scale) by power iteration
        reference, exact_info = None, {"min_eigenvalue": float("nan")}
        if "lissa" in methods and not settings.lissa_scale:
            exact_info["max_eigenvalue"] = ours.largest_eigenvalue(problem, settings) + settings.damping
        else:
            exact_info["max_eigenvalue"] = float("nan")
    scale = settings.lissa_scale or (
        largest_eigenvalue_bound(exact_info["max_eigenvalue"]) if "lissa" in methods else float("nan")
    )
    resolved = Resolved(settings, scale, settings.cg_max_iter)
    racing = problem.astype(dtype)
    ours_scores: dict[str, torch.Tensor] = {}
    cg_iterations_block = None
    rows: list[dict] = []
    for method in methods:
        base_time = None
        for lib in libraries:
            row = {"problem": problem.spec.name, "method": method, "library": lib}
            if note := NOTES.get((lib, method)):
                row["note"] = note
            try:
                if method == "exact" and not dense:
                    raise TooLargeError(f"p = {problem.p}: no dense Hessian")
                if lib == "influencer" and method == "exact" and dtype == torch.float64:
                    result: Run = ref_run
                    if repeats > 1:  # the reference run counts as the first
                        again = best_of(repeats - 1, lambda: ours.run("exact", problem, resolved))
                        result = again if again.seconds < ref_run.seconds else ref_run
                    row["info"] = {k: exact_info[k] for k in ("min_eigenvalue", "max_eigenvalue")}
                else:
                    runner = ours if lib == "influencer" else LIBRARIES[lib]()
                    result = best_of(repeats, lambda r=runner, m=method: r.run(m, racing, resolved), timeout)
                    if lib == "influencer":
                        row["info"] = {k: v for k, v in ours.last_info.items() if k != "eigenvalues"}
                        if method == "cg":
                            cg_iterations_block = int(ours.last_info["iterations"])
                            if "dattri" in libraries:  # an untimed plain-CG solve, for dattri alone
                                resolved.cg_iterations = ours.plain_cg_iterations(racing, resolved)
            except TooLargeError as exc:
                rows.append({**row, "status": "n/a", "reason": str(exc)})
                continue
            except RowTimeoutError as exc:
                rows.append({**row, "status": "timeout", "reason": str(exc), "seconds": timeout})
                continue
            except NotAvailableError:
                rows.append({**row, "status": "n/a"})
                continue
            except Exception as exc:  # a peer failing is a result, not a reason to stop
                traceback.print_exc(limit=4, file=sys.stderr)
                rows.append({**row, "status": "error", "error": describe_error(exc)})
                continue
            if lib == "influencer":
                base_time = result.seconds
                ours_scores[method] = result.scores
            counterpart = ours_scores.get(OURS_COUNTERPART.get(method, method))
            row.update(
                status="ok",
                fit_seconds=result.fit_seconds,
                score_seconds=result.score_seconds,
                seconds=result.seconds,
                **(
                    agreement(result.scores, reference)
                    if reference is not None
                    else {"pearson": None, "spearman": None, "rel_err": None}
                ),
                rel_ours=relative(result.scores, counterpart) if counterpart is not None else None,
                ratio=result.seconds / base_time if base_time else None,
            )
            rows.append(row)
    summary = {
        "spec": problem.spec,
        "dtype": str(dtype).replace("torch.", ""),
        "n_train": problem.n,
        "n_test": int(problem.x_test.shape[0]),
        "num_params": problem.p,
        "train_seconds": problem.train_seconds,
        "lissa_scale": scale,
        "cg_iterations_ours": cg_iterations_block,
        "cg_iterations_plain": resolved.cg_iterations
        if cg_iterations_block is not None and "dattri" in libraries
        else None,
        "hessian_eigenvalue_range": [exact_info["min_eigenvalue"], exact_info["max_eigenvalue"]],
    }
    return summary, rows


def render(summary: dict, rows: list[dict], settings: Settings) -> str:
    spec: ProblemSpec = summary["spec"]
    model = "logistic regression" if not spec.hidden else f"MLP {spec.hidden} tanh"
    model += f" on {spec.dataset}"
    lo, hi = summary["hessian_eigenvalue_range"]
    head = [
        f"{spec.name}: {model} on {spec.dataset}, n_train={summary['n_train']}, n_test={summary['n_test']}, "
        f"p={summary['num_params']}, weight_decay={spec.weight_decay:g}, every library in {summary['dtype']}",
        f"  damping={settings.damping:g} (eigenvalues of H + damping in [{lo:.3g}, {hi:.3g}]); "
        f"CG tol={settings.cg_tol:g} relative residual (ours: block CG, {summary['cg_iterations_ours']} "
        f"iterations; plain CG needs {summary['cg_iterations_plain']}, which dattri, having no "
        "tolerance, runs)",
        f"  LiSSA depth={settings.lissa_depth} batch={settings.lissa_batch} repeats={settings.lissa_repeats} "
        f"scale={summary['lissa_scale']:.4g} (1.5 x largest eigenvalue); "
        f"Arnoldi rank={settings.arnoldi_rank} Krylov dim={settings.arnoldi_iterations}; "
        f"projection {settings.projection_dim}x{settings.projection_dim} per layer",
    ]
    table = []
    for r in rows:
        if r["status"] == "ok":
            table.append(
                [
                    r["method"],
                    r["library"],
                    r["fit_seconds"],
                    r["score_seconds"],
                    r["seconds"],
                    r["ratio"],
                    r["pearson"],
                    r["spearman"],
                    r["rel_err"],
                    r["rel_ours"],
                    r.get("note", ""),
                ]
            )
        else:
            failed = "error: " + r.get("error", "")[:70]
            note = r.get("reason", "not implemented") if r["status"] in ("n/a", "timeout") else failed
            table.append([r["method"], r["library"], *[None] * 8, note])
    header = [
        "method",
        "library",
        "fit_s",
        "score_s",
        "time_s",
        "ratio",
        "pearson",
        "spearman",
        "rel_err",
        "rel_ours",
        "note",
    ]
    return "\n".join([*head, "", format_table(table, header, align="llrrrrrrrrl")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced smoke run (a few minutes on a CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="float64", choices=sorted(DTYPES), help="precision of every library"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--libraries", default=None, help=f"comma list of {', '.join(LIBRARIES)}")
    parser.add_argument(
        "--problems",
        default=None,
        help="comma list of problem names (default: the three small ones; large: "
        + ", ".join(s.name for s in LARGE_PROBLEMS)
        + ")",
    )
    parser.add_argument(
        "--tests",
        type=int,
        default=None,
        help="test points per problem (e.g. 10, 100, 1000; default: each problem's own, 10)",
    )
    parser.add_argument("--lissa-depth", type=int, default=None)
    parser.add_argument(
        "--damping",
        type=float,
        default=None,
        help="damping of every library (default 1e-3, 1e-2 on the large problems); a network's "
        "Hessian away from a polished minimum may need more for CG to see positive curvature",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="time each row as the best of this many runs")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="stop a row (all its repeats) after this many seconds and record it as a timeout",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write machine-readable results")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    specs = QUICK_PROBLEMS if args.quick else FULL_PROBLEMS
    if args.problems:
        wanted = args.problems.split(",")
        known = {s.name: s for s in (*QUICK_PROBLEMS, *FULL_PROBLEMS, *LARGE_PROBLEMS)}
        if unknown := [w for w in wanted if w not in known]:
            parser.error(f"unknown problems {unknown}; choose from {', '.join(known)}")
        specs = tuple(known[w] for w in wanted)
    if args.tests is not None:
        if args.tests < 1:
            parser.error("--tests must be >= 1")
        specs = tuple(dataclasses.replace(s, n_test=args.tests) for s in specs)
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    if args.lissa_depth:
        settings = dataclasses.replace(settings, lissa_depth=args.lissa_depth)
    methods, libraries = chosen(parser, args.methods, args.libraries, METHODS)
    dtype = DTYPES[args.dtype]

    env = {
        "machine": machine(device),
        "versions": versions(PACKAGES),
        "device": str(device),
        "dtype": args.dtype,
    }
    print(f"device={device}  " + "  ".join(f"{k}={v}" for k, v in env["versions"].items()))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()))
    preload(libraries)
    results = []
    for spec in specs:
        problem = make_problem(spec, device)
        preload([])  # exempt the problem's training objects from every later collection too
        own = settings
        if spec.name in {s.name for s in LARGE_PROBLEMS}:
            depth = args.lissa_depth or LARGE_SETTINGS.lissa_depth
            own = dataclasses.replace(LARGE_SETTINGS, lissa_depth=depth)
        if args.damping is not None:
            own = dataclasses.replace(own, damping=args.damping)
        summary, rows = run_problem(problem, own, methods, libraries, dtype, args.repeats, args.timeout_s)
        summary["settings"] = own
        print()
        print(render(summary, rows, own), flush=True)
        results.append({**summary, "rows": rows})
    if args.json:
        write_json(args.json, {**env, "settings": settings, "problems": results})
        print(f"\nwrote {args.json}")
    failed = [
        r for p in results for r in p["rows"] if r["library"] == "influencer" and r["status"] == "error"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
