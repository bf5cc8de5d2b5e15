"""How influencer's estimators scale with the training set (n) and the model (p), in training epochs.

Grid: ``n`` in {1k, 10k, 50k} training examples x ``p`` in {1e3, 1e5, 1e6} parameters, each cell an
MLP on synthetic Gaussian inputs with labels from a random teacher network (synthetic data: the
cost of these methods does not depend on what the data mean, only on n, p and the settings), sized
to hit p (see ``ARCHITECTURES``). In every cell each method computes all-pairs scores of the ``n``
training examples on ``--test`` (default 100) test examples. Reported per (cell, method):

* ``fit_s``, ``score_s``: wall time of ``Influence(...).fit()`` and of ``.scores(test)``;
* ``x_epoch``: ``(fit_s + score_s)`` divided by ONE training epoch of the same model on the same
  data and device (SGD, batch 128, mean cross-entropy + L2), timed in the same process: the last
  training epoch, or with ``--epoch-repeats R`` the median of it and ``R - 1`` more epochs timed
  on a copy of the model (one epoch's time varies by 10-15% on a shared machine);
* ``rss_mib``: growth of the peak resident memory (``ru_maxrss``) over the method, measured in a
  fresh process per (cell, method) after the model, data and epoch are in place; on CUDA also
  ``cuda_mib``, ``torch.cuda.max_memory_allocated`` over the method.

Every method uses the Gauss-Newton curvature (positive semi-definite at any parameters: the model
is trained for ``--epochs`` epochs only, so the Hessian may be indefinite), damping 1e-3.

Cells predicted to take longer than ``--budget-s`` are not run: a method's time is extrapolated from
its largest completed cell by ``n * p`` (every method here costs a fixed number of passes over the
data, each linear in ``n * p``), and the row says ``skipped: predicted X s`` with the cell it was
extrapolated from. The methods are a registry of small callables (:data:`METHODS`): a new method,
e.g. a projected gradient store built once and then queried, is one more entry, see
:func:`influence_method` and :class:`Cell`.

Run inside the benchmark environment::

    .venv-bench/bin/python benchmarks/bench_scaling.py --quick            # a few minutes on a CPU
    .venv-bench/bin/python benchmarks/bench_scaling.py --json out/scaling.json   # the full grid: hours
    .venv-bench/bin/python benchmarks/bench_scaling.py --n 1000 --p 100000 --methods identity,ekfac
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import NUM_CLASSES, format_table, machine, synchronize, synthetic_data, versions, write_json
from torch import Tensor, nn

GRID_N = (1_000, 10_000, 50_000)
GRID_P = (1_000, 100_000, 1_000_000)
QUICK_N = (1_000,)
QUICK_P = (1_000, 100_000)
# p -> (input dimension, hidden widths): MLP d -> h -> h -> 10 with tanh, biases included.
ARCHITECTURES = {
    1_000: (40, (16, 16)),  # p = 1,098 (MNIST-1D-sized inputs)
    100_000: (128, (256, 256)),  # p = 101,386
    1_000_000: (512, (768, 768)),  # p = 992,266
}


def architecture_params(p: int) -> int:
    """The exact parameter count of grid size ``p``'s MLP."""
    d, hidden = ARCHITECTURES[p]
    widths = [d, *hidden, NUM_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


@dataclasses.dataclass(frozen=True)
class Settings:
    damping: float = 1e-3
    weight_decay: float = 1e-4
    cg_max_iter: int = 100
    cg_tol: float = 1e-6
    lissa_depth: int = 1000
    lissa_batch: int = 32
    arnoldi_rank: int = 50
    arnoldi_iterations: int = 100
    epochs: int = 2  # training epochs before influence (the last one is the timed unit)
    epoch_repeats: int = 1  # timed epochs whose median is the unit (the last training epoch first)
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0


QUICK_SETTINGS = Settings(cg_max_iter=10, lissa_depth=50, arnoldi_rank=10, arnoldi_iterations=20, epochs=1)


@dataclasses.dataclass
class Cell:
    """One grid cell, ready for a method: a trained model, its task, data and device.

    A method is ``run(cell, stage) -> scores``: it wraps whatever it builds once (curvature,
    factors, an index) in ``with stage("fit"):`` and its test-time work (directions, queries,
    products with the training set) in ``with stage("score"):``, and returns ``(m, n)`` scores,
    ``(m, k)`` top-k scores, or None.
    """

    n: int
    p: int
    model: nn.Module
    task: Any  # influencer.ClassificationTask
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    device: torch.device
    settings: Settings
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # a method may report extras here


class Stage:
    """``with stage("fit"): ...``: wall time per named stage, GPU synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        stage = self

        class _Timer:
            def __enter__(self) -> None:
                synchronize(stage.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                synchronize(stage.device)
                stage.seconds[name] = stage.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()


Method = Callable[[Cell, Stage], "Tensor | None"]


def influence_method(make_estimator: Callable[[Cell], Any], curvature: str = "gauss_newton") -> Method:
    """A method that is ``Influence(..., estimator).fit()`` then ``.scores(test)``."""

    def run(cell: Cell, stage: Stage) -> Tensor:
        from influencer import Influence

        with stage("fit"):
            inf = Influence(
                cell.model, cell.task, cell.train, estimator=make_estimator(cell), curvature=curvature
            ).fit()
        with stage("score"):
            scores = inf.scores(cell.test)
        cell.info.update({k: v for k, v in inf.solver.info.items() if isinstance(v, (int, float, str))})
        return scores

    return run


def _identity(cell: Cell):
    from influencer import Identity

    return Identity()


def _ekfac(cell: Cell):
    from influencer import EKFAC

    return EKFAC(damping=cell.settings.damping)


def _arnoldi(cell: Cell):
    from influencer import Arnoldi

    s = cell.settings
    return Arnoldi(damping=s.damping, rank=s.arnoldi_rank, iterations=s.arnoldi_iterations, seed=s.seed)


def _cg(cell: Cell):
    from influencer import CG

    s = cell.settings
    # A fixed budget of iterations is what is timed: an unconverged solve is recorded, not refused.
    return CG(damping=s.damping, tol=s.cg_tol, max_iter=s.cg_max_iter, on_unconverged="warn")


def _lissa(cell: Cell):
    from influencer import LiSSA

    s = cell.settings
    return LiSSA(
        damping=s.damping,
        depth=s.lissa_depth,
        batch_size=s.lissa_batch,
        seed=s.seed,
        on_unconverged="warn",
    )


def projected_store(k_in: int, k_out: int, low: torch.dtype | None = None) -> Method:
    """The gradient index: build the projected store once (fit), then a streaming top-10 query.

    Kronecker (LoGra) projection ``k_in x k_out`` per layer in its default PCA basis (fitted on 4,096
    training examples, part of ``fit``), the projected Fisher (block-diagonal per layer, damped
    relative to its scale); the store lives in a temporary directory. ``low``: the products of the
    build's Fisher and of the query's scores in that dtype (``-bf16`` rows: bfloat16;
    ``fisher_dtype`` and ``score_dtype``).
    """

    def run(cell: Cell, stage: Stage) -> None:
        from influencer import Influence
        from influencer.index import GradientIndex, KroneckerProjector, ProjectedFisher

        with tempfile.TemporaryDirectory() as tmp:
            with stage("fit"):
                inf = Influence(cell.model, cell.task, cell.train, batch_size=512)
                projector = KroneckerProjector(k_in=k_in, k_out=k_out)
                index = GradientIndex.build(inf, Path(tmp) / "index", projector, chunk=4096, fisher_dtype=low)
            with stage("score"):
                index.top_k(
                    cell.test,
                    k=10,
                    preconditioner=ProjectedFisher(relative_damping=0.1),
                    score_dtype=low,
                )
        cell.info["k"] = index.k
        return None

    return run


# The registry: name -> run(cell, stage). One more row is one more entry.
METHODS: dict[str, Method] = {
    "identity": influence_method(_identity),
    "ekfac": influence_method(_ekfac),
    "arnoldi": influence_method(_arnoldi),
    "cg": influence_method(_cg),
    "lissa": influence_method(_lissa),
    "index-kron16": projected_store(16, 16),
    "index-kron24": projected_store(24, 24),
    "index-kron24-bf16": projected_store(24, 24, torch.bfloat16),
    "index-kron32": projected_store(32, 32),
}


# ---- one cell in this process ---------------------------------------------------------------------


def build_cell(n: int, p: int, m: int, settings: Settings, device: torch.device) -> tuple[Cell, float]:
    """Data, model and training; returns the cell and the seconds of its last training epoch."""
    from influencer import ClassificationTask
    from influencer.models import MLP

    if p not in ARCHITECTURES:
        raise SystemExit(f"p={p} has no architecture; choose from {sorted(ARCHITECTURES)}")
    d, hidden = ARCHITECTURES[p]
    torch.manual_seed(settings.seed)
    model = MLP(d, hidden, NUM_CLASSES).to(device)
    task = ClassificationTask(weight_decay=settings.weight_decay)
    train, test = synthetic_data(n, m, d, settings.seed, device)
    epoch = 0.0
    for _ in range(settings.epochs):
        epoch = train_epoch(model, task, train, settings)
    if settings.epoch_repeats > 1:
        epoch = median_epoch(model, task, train, settings, epoch)
    model.eval()
    cell = Cell(n, sum(q.numel() for q in model.parameters()), model, task, train, test, device, settings)
    return cell, epoch


def median_epoch(
    model: nn.Module, task: Any, train: tuple[Tensor, Tensor], settings: Settings, last: float
) -> float:
    """The median of ``last`` and ``settings.epoch_repeats - 1`` more epochs, timed on a copy of the
    model: the methods still see the model trained for ``settings.epochs``, and the random state
    (each epoch draws its order) is restored."""
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    spare = copy.deepcopy(model)
    times = [last] + [train_epoch(spare, task, train, settings) for _ in range(settings.epoch_repeats - 1)]
    torch.random.set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    return statistics.median(times)


def train_epoch(model: nn.Module, task: Any, train: tuple[Tensor, Tensor], settings: Settings) -> float:
    """One epoch of SGD (batch ``settings.batch_size``) on mean loss + Omega; its wall time."""
    x, y = train
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    order = torch.randperm(len(x), device=x.device)
    model.train()
    synchronize(x.device)
    start = time.perf_counter()
    for i in range(0, len(x), settings.batch_size):
        idx = order[i : i + settings.batch_size]
        loss = task.loss(model, (x[idx], y[idx])).mean() + task.regularizer(dict(model.named_parameters()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(x.device)
    return time.perf_counter() - start


def run_worker(n: int, p: int, m: int, method: str, settings: Settings, device: torch.device) -> dict:
    """Build the cell, then run one method, measuring time and memory growth over the method only."""
    import gc

    cell, epoch = build_cell(n, p, m, settings, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    stage = Stage(device)
    scores = METHODS[method](cell, stage)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "n": n,
        "p": p,
        "num_params": cell.p,
        "m": m,
        "method": method,
        "status": "ok",
        "epoch_seconds": epoch,
        "fit_seconds": stage.seconds.get("fit", 0.0),
        "score_seconds": stage.seconds.get("score", 0.0),
        "rss_growth_mib": (rss_peak - rss_base) / 1024,
        "info": cell.info,
    }
    if scores is not None:
        out["scores_shape"] = list(scores.shape)
        out["finite"] = bool(torch.isfinite(scores).all())
    if device.type == "cuda":
        out["cuda_growth_mib"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
    return out


# ---- the grid, one fresh process per (cell, method) ---------------------------------------------


def run_in_subprocess(args: argparse.Namespace, n: int, p: int, method: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            f"--n={n}",
            f"--p={p}",
            f"--methods={method}",
            f"--test={args.test}",
            f"--device={args.device}",
            f"--json={path}",
        ]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd.append(f"--threads={args.threads}")
        if args.epoch_repeats != 1:
            cmd.append(f"--epoch-repeats={args.epoch_repeats}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"n": n, "p": p, "method": method, "status": "timeout", "error": f"over {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"n": n, "p": p, "method": method, "status": "error", "error": tail[0][:200]}
        with open(path) as f:
            return json.load(f)


def predicted_seconds(done: list[dict], method: str, n: int, p: int) -> tuple[float, dict] | None:
    """Time of ``method`` at (n, p) scaled by ``n * p`` from its largest completed cell."""
    ok = [r for r in done if r["method"] == method and r["status"] == "ok"]
    if not ok:
        return None
    base = max(ok, key=lambda r: r["n"] * r["p"])
    seconds = (base["fit_seconds"] + base["score_seconds"]) * (n * p) / (base["n"] * base["p"])
    return seconds, base


def render(rows: list[dict], device: torch.device) -> str:
    table = []
    for r in rows:
        total = r.get("fit_seconds", 0.0) + r.get("score_seconds", 0.0)
        if r["status"] == "ok":
            note = "non-finite scores" if r.get("finite") is False else _info_note(r.get("info", {}))
            cells = [
                r["fit_seconds"],
                r["score_seconds"],
                total / r["epoch_seconds"],
                r["epoch_seconds"],
                r["rss_growth_mib"],
            ]
            if device.type == "cuda":
                cells.append(r.get("cuda_growth_mib"))
        else:
            note = f"{r['status']}: {r.get('error', '')}"
            cells = [None] * (6 if device.type == "cuda" else 5)
        table.append([r["n"], r.get("num_params", r["p"]), r["method"], *cells, note])
    header = ["n", "p", "method", "fit_s", "score_s", "x_epoch", "epoch_s", "rss_mib"]
    if device.type == "cuda":
        header.append("cuda_mib")
    header.append("note")
    align = "rrl" + "r" * (len(header) - 4) + "l"
    return format_table(table, header, align=align)


def _info_note(info: dict) -> str:
    keys = [k for k in ("iterations", "converged", "scale") if k in info]
    return " ".join(f"{k}={info[k]:.4g}" if isinstance(info[k], float) else f"{k}={info[k]}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="n=1k, p in {1e3, 1e5}, 20 test points, reduced settings"
    )
    parser.add_argument("--n", default=None, help="comma list of training set sizes (default: the grid)")
    parser.add_argument(
        "--p", default=None, help=f"comma list of parameter counts among {sorted(ARCHITECTURES)}"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument(
        "--test", type=int, default=None, help="test examples scored against all of n (100; 20 --quick)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="skip cells predicted to take longer")
    parser.add_argument(
        "--epoch-repeats",
        type=int,
        default=1,
        help="timed epochs whose median is the unit: the last training epoch and R - 1 more on a copy",
    )
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    if args.epoch_repeats < 1:
        parser.error("--epoch-repeats must be at least 1")
    settings = dataclasses.replace(
        QUICK_SETTINGS if args.quick else Settings(), epoch_repeats=args.epoch_repeats
    )
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}")
    ns = [int(float(v)) for v in args.n.split(",")] if args.n else list(QUICK_N if args.quick else GRID_N)
    ps = [int(float(v)) for v in args.p.split(",")] if args.p else list(QUICK_P if args.quick else GRID_P)
    if bad := [p for p in ps if p not in ARCHITECTURES]:
        parser.error(f"no architecture for p={bad}; choose from {sorted(ARCHITECTURES)}")

    if args.test is None:
        args.test = 20 if args.quick else 100
    if args.worker:
        result = run_worker(ns[0], ps[0], args.test, methods[0], settings, device)
        write_json(args.json, result)
        return 0

    env = {"machine": machine(device), "versions": versions(("influencer", "torch")), "device": str(device)}
    print(f"device={device}  " + "  ".join(f"{k}={v}" for k, v in env["versions"].items()))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()))
    print(
        f"synthetic data, MLP tanh, {args.test} test examples x all n, Gauss-Newton curvature, "
        f"damping={settings.damping:g}; CG max_iter={settings.cg_max_iter} tol={settings.cg_tol:g}; "
        f"LiSSA depth={settings.lissa_depth} batch={settings.lissa_batch}; "
        f"Arnoldi rank={settings.arnoldi_rank} Krylov dim={settings.arnoldi_iterations}; "
        f"EK-FAC exact Fisher; epoch = SGD batch {settings.batch_size}",
        flush=True,
    )
    rows: list[dict] = []
    cells = sorted(((n, p) for n in ns for p in ps), key=lambda c: c[0] * c[1])
    for n, p in cells:
        for method in methods:
            guess = predicted_seconds(rows, method, n, p)
            if guess and guess[0] > args.budget_s:
                seconds, base = guess
                rows.append(
                    {
                        "n": n,
                        "p": p,
                        "method": method,
                        "num_params": architecture_params(p),
                        "status": "skipped",
                        "predicted_seconds": seconds,
                        "error": (
                            f"predicted {seconds:.3g} s > budget (x n*p from n={base['n']}, p={base['p']})"
                        ),
                    }
                )
            else:
                timeout = max(4 * args.budget_s, 600.0)
                rows.append(run_in_subprocess(args, n, p, method, timeout))
            print(f"  done n={n} p={p} {method}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    print()
    print(render(rows, device))
    if args.json:
        write_json(args.json, {**env, "settings": settings, "rows": rows})
        print(f"\nwrote {args.json}")
    return 1 if any(r["status"] in ("error", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
