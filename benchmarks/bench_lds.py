"""Linear datamodeling score (LDS) of every estimator, ours and the peers', on an MLP retrained from scratch.

The faithfulness check of Park et al. (TRAK, 2023): draw ``M`` random subsets of the training set,
each keeping half of it; retrain the model from scratch on each with the recipe that trained it
(``--seeds`` retraining seeds per subset, averaged); and for every test example correlate (Spearman,
over the subsets) the actual change of its test loss with the change a method predicts, the sum
of the removal scores of the examples the subset leaves out. The LDS is the mean over test examples.

Problem (full run): MNIST-1D (``mnist1d``'s ``make_dataset``, never its downloader; 1,600 training
and the first 100 test signals), MLP 40-64-10 with tanh (p = 3,274), objective mean cross-entropy
+ 1e-2/2 ||theta||^2, trained in float64 by 60 epochs of Adam (lr 1e-2, batch 64) from a seeded
initialisation: the attributed model is seed 0. Every library scores that model with the same
damping (1e-3, added to the curvature, whose own L2 part is the weight decay); LiSSA, Arnoldi and CG
settings as in ``bench_estimators.py``. Adam's end point is not a minimum: the Hessian there is
indefinite, so our Hessian-based estimators run on the Gauss-Newton curvature (``--curvature``);
the peers run what they have (the Hessian for exact, CG, LiSSA and Arnoldi; K-FAC/EK-FAC are
Gauss-Newton by construction).

Beyond one model, the rows marked ``K = 5`` average the scores of 5 models trained with the same
recipe from seeds 0-4 (``influencer.ensemble.Ensemble``; dattri's and captum's TracIn do the same
with their checkpoint lists; kronfluence and pyDVL have no ensembles, so the benchmark averages
their K-FAC/EK-FAC scores itself, marked as such; dattri's checkpoint lists for its influence
functions ran out of memory here, over 21 GB), ``x5 ckpt`` adds the checkpoints of the last 5
epochs of each run (``AdamRetrainer.trajectory``), and ``damping chosen`` picks the damping by the
LDS on separate tuning subsets (``influencer.uses.validation.choose_damping``), never on the subsets
it is scored on.
The ``index`` rows score with the projected gradient store (``influencer.index``: per-example
gradients projected to k dimensions, Kronecker per layer in a PCA or a random basis, or dense
Gaussian), preconditioned by the store's projected Fisher or by our EK-FAC before projection: how
much LDS the store gives up against exact-gradient EK-FAC.

Every refit is cached on disk (``--cache``, keyed by everything it depends on), so an interrupted run
resumes and a second run retrains nothing. Run inside the benchmark environment::

    .venv-bench/bin/python benchmarks/bench_lds.py --quick          # a few minutes
    .venv-bench/bin/python benchmarks/bench_lds.py --json out/bench_lds.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri and pyDVL draw progress bars by default

import numpy as np
import torch
from common import Problem, ProblemSpec, build_model, format_table, load_split, machine, versions, write_json
from peers import (
    LIBRARIES,
    NOTES,
    NotAvailableError,
    Ours,
    Resolved,
    Settings,
    chosen,
    largest_eigenvalue_bound,
    preload,
)
from torch import Tensor, nn

from influencer import ClassificationTask, Influence
from influencer.ensemble import Ensemble
from influencer.estimators import Identity
from influencer.index import (
    EstimatorPreconditioner,
    GaussianProjector,
    GradientIndex,
    KroneckerProjector,
    ProjectedFisher,
)
from influencer.retraining import AdamRetrainer
from influencer.retraining_cache import CachedRetrainer
from influencer.uses.validation import (
    LDSResult,
    SubsetRetraining,
    choose_damping,
    linear_datamodeling_score,
    retrain_on_subsets,
)

METHODS = ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac", "ekfac-emp", "identity", "index")
# Ours only: the projected gradient store (``influencer.index``), built once, queried per test set.
# "kron AxB" is the default PCA basis, "kron AxB random" the random one.
INDEX_VARIANTS = (
    ("kron 8x8", "fisher"),
    ("kron 16x16", "fisher"),
    ("kron 24x24", "fisher"),
    ("kron 32x32", "fisher"),
    ("kron 16x16 random", "fisher"),
    ("kron 24x24 random", "fisher"),
    ("kron 32x32 random", "fisher"),
    ("kron 16x16", "ekfac"),
    ("gauss 512", "fisher"),
)
INDEX_DAMPINGS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # relative to each block's mean eigenvalue
# Methods whose solve uses the curvature operator (the others build their own factors or none).
CURVATURE_METHODS = ("exact", "cg", "lissa", "arnoldi")
# Which peers average over several models themselves, and for which methods.
# dattri's checkpoint lists for its influence functions (exact, CG, LiSSA) held over 21 GB on the
# full problem here and were killed by the OOM killer: only its TracIn runs its own ensemble.
PEER_ENSEMBLES = {"dattri": ("identity",), "captum": ("identity",)}
# dattri holds per-test-example work for all test examples at once (its CG took 22 GB for 100 test
# examples here): it scores them 10 at a time, as in bench_estimators.py.
TEST_CHUNK = {"dattri": 10}
PARTIAL: dict[str, str | None] = {"path": None}
PACKAGES = ("influencer", "torch", "captum", "dattri", "pyDVL", "kronfluence", "bergson")


@dataclasses.dataclass(frozen=True)
class Setup:
    spec: ProblemSpec
    recipe: AdamRetrainer
    subsets: int
    tuning_subsets: int
    alpha: float
    seeds: tuple[int, ...]  # retraining seeds (disjoint from the attributed models' 0..K-1)
    ensemble: int  # K
    checkpoints: int  # last epochs per member in the checkpoint ensembles
    settings: Settings
    ensemble_methods: tuple[str, ...]


FULL = Setup(
    ProblemSpec("mlp-mnist1d", dataset="mnist1d", hidden=(64,), weight_decay=1e-2, n_test=100),
    AdamRetrainer(epochs=60, lr=1e-2, batch_size=64),
    subsets=100,
    tuning_subsets=20,
    alpha=0.5,
    seeds=(100, 101),
    ensemble=5,
    checkpoints=5,
    settings=Settings(),
    ensemble_methods=("exact", "cg", "kfac", "ekfac", "identity"),
)
QUICK = Setup(
    ProblemSpec(
        "mlp-mnist1d-400", dataset="mnist1d", hidden=(16,), weight_decay=1e-2, n_train=400, n_test=40
    ),
    AdamRetrainer(epochs=30, lr=1e-2, batch_size=64),
    subsets=20,
    tuning_subsets=8,
    alpha=0.5,
    seeds=(100,),
    ensemble=3,
    checkpoints=3,
    settings=Settings(lissa_depth=200, arnoldi_rank=20, arnoldi_iterations=40),
    ensemble_methods=("exact", "ekfac", "identity"),
)


# ---- the models and the retraining ---------------------------------------------------------------


@dataclasses.dataclass
class World:
    """The data, the K trained models and the retraining measurements."""

    problem: Problem  # the attributed model (seed 0), its members = seeds 1..K-1
    reference: Influence  # architecture + data that are retrained (every refit starts from init(seed))
    thetas: list[Tensor]  # (p,) per model, seed k
    init: Callable[[int], nn.Module]
    retraining: SubsetRetraining  # the subsets every row is scored on
    tuning: SubsetRetraining  # other subsets, for choosing damping
    seconds: dict[str, float]


def build_world(setup: Setup, device: torch.device, cache: str) -> World:
    spec = setup.spec
    split = load_split(spec)
    n = spec.n_train or len(split.x_train)
    x_train, y_train = split.x_train[:n].to(device), split.y_train[:n].to(device)
    x_test, y_test = split.x_test[: spec.n_test].to(device), split.y_test[: spec.n_test].to(device)
    task = ClassificationTask(weight_decay=spec.weight_decay)

    def init(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(spec, x_train.shape[1], split.num_classes).to(device, torch.float64)

    reference = Influence(init(0), task, (x_train, y_train))
    recipe = CachedRetrainer(setup.recipe, cache)
    seconds = {}
    start = time.perf_counter()
    thetas = [
        recipe.with_seed(k).refit(reference, None, reference.parameters_of(init(k)))
        for k in range(setup.ensemble)
    ]
    seconds["train_models"] = time.perf_counter() - start
    models = [reference.model_at(t) for t in thetas]
    problem = Problem(
        spec, models[0], task, x_train, y_train, x_test, y_test, device,
        seconds["train_models"] / setup.ensemble,
        members=tuple(models[1:]),
    )  # fmt: skip
    common = {"alpha": setup.alpha, "retrain": recipe, "start": init, "seeds": setup.seeds}
    start = time.perf_counter()
    retraining = retrain_on_subsets(reference, problem.test, subsets=setup.subsets, seed=0, **common)
    tuning = retrain_on_subsets(reference, problem.test, subsets=setup.tuning_subsets, seed=1, **common)
    seconds["retrain_subsets"] = time.perf_counter() - start
    return World(problem, reference, thetas, init, retraining, tuning, seconds)


def single(problem: Problem) -> Problem:
    return dataclasses.replace(problem, members=())


# ---- rows ----------------------------------------------------------------------------------------


def ours_influence(method: str, world: World, resolved: Resolved, curvature: str, theta: Tensor) -> Influence:
    # Plain CG here: its iteration count is what dattri (no tolerance) runs to match it.
    estimator = Ours().estimator(method, resolved, block=False)
    kind = curvature if method in CURVATURE_METHODS else "hessian"  # K-FAC & co. build their own
    return world.reference.replace(estimator=estimator, curvature=kind, theta=theta)


def lds_row(scores: Tensor, world: World, **fields: Any) -> dict[str, Any]:
    result: LDSResult = linear_datamodeling_score(scores, world.retraining)
    return {
        **fields,
        "status": "ok",
        "lds": result.mean,
        "low": result.interval[0],
        "high": result.interval[1],
        "median": float(np.nanmedian(result.correlations)),
        "correlations": result.correlations.tolist(),
    }


def attempt(
    rows: list[dict], fields: dict[str, Any], run: Callable[[], tuple[Tensor, float]], world: World
) -> None:
    """Run one row; a library failing or lacking the method is a result, not a reason to stop."""
    try:
        scores, seconds = run()
    except NotAvailableError:
        rows.append({**fields, "status": "n/a"})
        return
    except Exception as exc:
        traceback.print_exc(limit=3, file=sys.stderr)
        rows.append({**fields, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    rows.append(lds_row(scores, world, **fields, seconds=seconds))
    if PARTIAL["path"]:  # rows so far, in case a peer takes the process down (e.g. out of memory)
        write_json(PARTIAL["path"], {"rows": rows})
    r = rows[-1]
    print(
        f"  {fields['method']:10s} {fields['library']:12s} K={fields['models']:<3} LDS {r['lds']:.3f}",
        flush=True,
    )


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_rows(
    world: World, setup: Setup, methods: list[str], libraries: list[str], curvature: str
) -> tuple[dict, list]:
    s = setup.settings
    problem = single(world.problem)
    theta0 = world.thetas[0]
    test = problem.test
    rows: list[dict] = []
    # Shared values: LiSSA's scale from the largest eigenvalue of our exact (curvature + damping),
    # the CG iteration count for dattri (which has no tolerance).
    exact = ours_influence("exact", world, Resolved(s, 1.0, 1), curvature, theta0).fit()
    exact_scores = exact.scores(test)
    info = dict(exact.solver.info)
    resolved = Resolved(s, largest_eigenvalue_bound(info["max_eigenvalue"]), s.cg_max_iter)
    header = {
        "curvature_eigenvalues": [info["min_eigenvalue"], info["max_eigenvalue"]],
        "lissa_scale": resolved.lissa_scale,
    }
    try:  # the Hessian itself at this point, for the record
        hess = world.reference.replace(theta=theta0, estimator=Ours().estimator("exact", resolved)).fit()
        header["hessian_eigenvalues"] = [
            hess.solver.info["min_eigenvalue"],
            hess.solver.info["max_eigenvalue"],
        ]
    except Exception as exc:  # indefinite: our Exact refuses and says by how much
        header["hessian_refused"] = str(exc)

    print("single model (seed 0):", flush=True)
    for method in methods:
        if method == "index":
            index_rows(rows, world, resolved, theta0)
            continue
        for lib in libraries:
            fields = {"method": method, "library": lib, "models": 1, "note": NOTES.get((lib, method), "")}
            if lib == "influencer":
                if method in CURVATURE_METHODS:
                    fields["note"] = f"{curvature} curvature"

                def ours(method: str = method) -> tuple[Tensor, float]:
                    if method == "exact":
                        return exact_scores, 0.0
                    inf = ours_influence(method, world, resolved, curvature, theta0)
                    out = timed(lambda: inf.fit().scores(test))
                    if method == "cg":
                        resolved.cg_iterations = int(inf.solver.info["iterations"])
                    return out

                attempt(rows, fields, ours, world)
            else:
                run = LIBRARIES[lib]().run
                attempt(
                    rows,
                    fields,
                    lambda run=run, method=method, lib=lib: _peer(run, method, problem, resolved, lib),
                    world,
                )

    # Damping chosen by the data: the LDS on the tuning subsets (never the scored ones).
    for method in ("exact", "ekfac"):
        if method not in methods:
            continue
        base = ours_influence(method, world, resolved, curvature, theta0)
        choice = choose_damping(base, test, world.tuning)
        chosen = base.replace(estimator=dataclasses.replace(base.estimator, damping=choice.damping))
        note = f"damping {choice.damping:.3g} chosen on {setup.tuning_subsets} other subsets"
        fields = {
            "method": method,
            "library": "influencer",
            "models": 1,
            "note": note,
            "choice": choice.summary(),
        }
        attempt(rows, fields, lambda chosen=chosen: timed(lambda: chosen.fit().scores(test)), world)

    K = len(world.thetas)
    print(f"ensembles of {K} models (seeds 0-{K - 1}):", flush=True)
    for method in setup.ensemble_methods:
        if method not in methods:
            continue

        def ensemble(method: str = method) -> tuple[Tensor, float]:
            base = ours_influence(method, world, resolved, curvature, theta0)
            return timed(lambda: Ensemble.from_checkpoints(base, world.thetas).fit().scores(test))

        attempt(
            rows,
            {"method": method, "library": "influencer", "models": K, "note": "Ensemble"},
            ensemble,
            world,
        )
        for lib in libraries:
            if lib == "influencer":
                continue
            fields = {"method": method, "library": lib, "models": K}
            if method in PEER_ENSEMBLES.get(lib, ()):
                run = LIBRARIES[lib]().run
                fields["note"] = "its own checkpoint ensemble"
                attempt(
                    rows,
                    fields,
                    lambda run=run, method=method, lib=lib: _peer(run, method, world.problem, resolved, lib),
                    world,
                )
            elif lib in ("kronfluence", "pydvl") and method in ("ekfac", "kfac"):
                fields["note"] = "no ensembles: averaged by the benchmark"
                attempt(
                    rows,
                    fields,
                    lambda lib=lib, method=method: _averaged(lib, method, world, resolved),
                    world,
                )

    # Checkpoints along each run: the last epochs of one run (the same training budget as one model)
    # and of every member.
    epochs = list(range(setup.recipe.epochs - setup.checkpoints + 1, setup.recipe.epochs + 1))
    paths = [
        setup.recipe.with_seed(k).trajectory(
            world.reference, None, world.reference.parameters_of(world.init(k)), epochs
        )
        for k in range(K)
    ]
    for label, thetas in (
        (f"seed 0 x last {len(epochs)} epochs", paths[0]),
        (f"{K} seeds x last {len(epochs)} epochs", [t for path in paths for t in path]),
    ):
        for method in ("kfac", "ekfac", "identity"):
            if method not in methods:
                continue
            base = ours_influence(method, world, resolved, curvature, theta0)
            fields = {"method": method, "library": "influencer", "models": len(thetas), "note": label}

            def checkpoints(base: Influence = base, thetas: list[Tensor] = thetas) -> tuple[Tensor, float]:
                return timed(lambda: Ensemble.from_checkpoints(base, thetas).fit().scores(test))

            attempt(rows, fields, checkpoints, world)
    return header, rows


def index_rows(rows: list[dict], world: World, resolved: Resolved, theta: Tensor) -> None:
    """LDS of the projected gradient store, beside exact-gradient EK-FAC (same model, same damping).

    ``fisher``: the store's own projected empirical Fisher, damped by 0.1 x each layer block's mean
    eigenvalue (the library's default); ``fisher, damping chosen``: that relative damping picked
    among INDEX_DAMPINGS by the LDS on the tuning subsets (never the scored ones); ``ekfac``: our
    fitted EK-FAC applied to the test gradients before projection.
    """
    test = single(world.problem).test
    plain = world.reference.replace(estimator=Identity(), theta=theta)
    ekfac = ours_influence("ekfac", world, resolved, "hessian", theta)
    fitted = None
    for name, label in INDEX_VARIANTS:
        kind, size, *basis = name.split(" ")
        if kind == "kron":
            a, b = (int(v) for v in size.split("x"))
            projector = KroneckerProjector(k_in=a, k_out=b, basis=basis[0] if basis else "pca")
        else:
            projector = GaussianProjector(k=int(size))
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            index = GradientIndex.build(plain, Path(folder) / "index", projector)
            build = time.perf_counter() - start
            if label == "ekfac":
                if fitted is None:
                    fitted = ekfac.fit()
                choices = [("ekfac", EstimatorPreconditioner(), GradientIndex.open(index.path, fitted))]
            else:
                tuned = max(
                    INDEX_DAMPINGS,
                    key=lambda d: (
                        linear_datamodeling_score(
                            index.scores(test, preconditioner=ProjectedFisher(relative_damping=d)),
                            world.tuning,
                        ).mean
                    ),
                )
                # the same store with its Fisher's products in bfloat16 (fisher_dtype)
                low_index = GradientIndex.build(
                    plain, Path(folder) / "index-bf16", projector, fisher_dtype=torch.bfloat16
                )
                choices = [
                    ("fisher", ProjectedFisher(relative_damping=0.1), index),
                    (f"fisher, damping {tuned:g} chosen", ProjectedFisher(relative_damping=tuned), index),
                    ("fisher, bfloat16 score products", ProjectedFisher(relative_damping=0.1), index),
                    (
                        "fisher, bfloat16 Fisher and score products",
                        ProjectedFisher(relative_damping=0.1),
                        low_index,
                    ),
                ]
            for text, pre, store in choices:
                low = torch.bfloat16 if "bfloat16" in text else None
                fields = {
                    "method": "index",
                    "library": "influencer",
                    "models": 1,
                    "note": f"{name} + {text} (k = {index.k})",
                }

                def run(store=store, pre=pre, build=build, low=low) -> tuple[Tensor, float]:
                    begin = time.perf_counter()
                    scores = store.scores(test, preconditioner=pre, score_dtype=low)
                    return scores, build + time.perf_counter() - begin

                attempt(rows, fields, run, world)


def _peer(run: Callable, method: str, problem: Problem, resolved: Resolved, lib: str) -> tuple[Tensor, float]:
    """A peer's scores ``(m, n)``, in chunks of test examples where it needs them (rows are independent)."""
    chunk = TEST_CHUNK.get(lib, len(problem.x_test))
    scores, seconds = [], 0.0
    for i in range(0, len(problem.x_test), chunk):
        part = dataclasses.replace(
            problem, x_test=problem.x_test[i : i + chunk], y_test=problem.y_test[i : i + chunk]
        )
        out = run(method, part, resolved)
        scores.append(out.scores)
        seconds += out.seconds
    return torch.cat(scores), seconds


def _averaged(lib: str, method: str, world: World, resolved: Resolved) -> tuple[Tensor, float]:
    total, seconds = None, 0.0
    for model in (world.problem.model, *world.problem.members):
        one = dataclasses.replace(world.problem, model=model, members=())
        out = LIBRARIES[lib]().run(method, one, resolved)
        total = out.scores if total is None else total + out.scores
        seconds += out.seconds
    assert total is not None
    return total / len(world.thetas), seconds


# ---- report --------------------------------------------------------------------------------------


def noise_ceiling(r: SubsetRetraining) -> float | None:
    """The LDS of one retraining seed's actual changes as the prediction of another seed's."""
    if r.measurements.shape[1] < 2:
        return None
    a = r.measurements[:, 0] - r.full[0]
    b = r.measurements[:, 1] - r.full[1]
    from influencer._kernel.stats import spearman

    return float(np.nanmean([spearman(a[:, j], b[:, j]) for j in range(a.shape[1])]))


def render(setup: Setup, world: World, header: dict, rows: list[dict], curvature: str) -> str:
    spec, s = setup.spec, setup.settings
    ceiling = noise_ceiling(world.retraining)
    lines = [
        f"{spec.name}: MLP {spec.hidden} tanh on {spec.dataset}, n_train={world.problem.n}, "
        f"n_test={world.problem.x_test.shape[0]}, p={world.problem.p}, "
        f"weight_decay={spec.weight_decay:g}, float64",
        f"  recipe: {setup.recipe.epochs} epochs of Adam (lr {setup.recipe.lr:g}, "
        f"batch {setup.recipe.batch_size}) "
        f"from a seeded initialisation; attributed model seed 0, ensembles seeds 0-{setup.ensemble - 1}",
        f"  LDS: {setup.subsets} subsets keeping {setup.alpha:g}, retrained from scratch with seeds "
        f"{list(setup.seeds)} (averaged); damping chosen on {setup.tuning_subsets} other subsets",
        f"  damping={s.damping:g}; our curvature for exact/CG/LiSSA/Arnoldi: {curvature}, "
        "eigenvalues of it + "
        f"damping in [{header['curvature_eigenvalues'][0]:.3g}, {header['curvature_eigenvalues'][1]:.3g}]; "
        f"LiSSA depth={s.lissa_depth} scale={header['lissa_scale']:.3g}; "
        f"Arnoldi {s.arnoldi_rank}/{s.arnoldi_iterations}",
    ]
    if "hessian_refused" in header:
        lines.append(f"  the Hessian at seed 0: {header['hessian_refused'][:140]}")
    if ceiling is not None:
        lines.append(f"  noise ceiling (one retraining seed predicting the other): {ceiling:.3f}")
    lines.append(
        f"  time: training {setup.ensemble} models {world.seconds['train_models']:.0f} s, "
        f"retraining subsets {world.seconds['retrain_subsets']:.0f} s (cached runs: reading only)"
    )
    table = []
    for r in rows:
        if r["status"] == "ok":
            table.append(
                [
                    r["method"],
                    r["library"],
                    r["models"],
                    r["lds"],
                    r["low"],
                    r["high"],
                    r["median"],
                    r.get("seconds"),
                    r.get("note", ""),
                ]
            )
        else:
            text = "not implemented" if r["status"] == "n/a" else "error: " + r["error"][:80]
            table.append([r["method"], r["library"], r["models"], None, None, None, None, None, text])
    head = ["method", "library", "K", "lds", "low", "high", "median", "time_s", "note"]
    return "\n".join([*lines, "", format_table(table, head, align="llrrrrrrl")])


def headline(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    peers1 = [r for r in ok if r["library"] != "influencer" and r["models"] == 1]
    ours1 = [r for r in ok if r["library"] == "influencer" and r["models"] == 1]
    peers_all = [r for r in ok if r["library"] != "influencer"]
    ours_all = [r for r in ok if r["library"] == "influencer"]

    def best(rs: list[dict]) -> str:
        r = max(rs, key=lambda r: r["lds"])
        note = f", {r['note']}" if r.get("note") else ""
        what = f"{r['library']} {r['method']}, K={r['models']}{note}"
        return f"{r['lds']:.3f} [{r['low']:.3f}, {r['high']:.3f}] ({what})"

    out = []
    if peers1 and ours1:
        out.append(f"one model:   best peer {best(peers1)}; ours {best(ours1)}")
    if peers_all and ours_all:
        out.append(f"any setting: best peer {best(peers_all)}; ours {best(ours_all)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small problem, 20 subsets (a few minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--libraries", default=None, help=f"comma list of {', '.join(LIBRARIES)}")
    parser.add_argument("--curvature", default="gauss_newton", choices=("hessian", "gauss_newton"))
    parser.add_argument("--subsets", type=int, default=None, help="override the number of subsets M")
    parser.add_argument(
        "--cache", default=None, help="directory of cached refits (default out/lds-cache[-quick])"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = QUICK if args.quick else FULL
    if args.subsets:
        setup = dataclasses.replace(setup, subsets=args.subsets)
    methods, libraries = chosen(parser, args.methods, args.libraries, METHODS)
    cache = args.cache or ("out/lds-cache-quick" if args.quick else "out/lds-cache")
    if args.json:
        PARTIAL["path"] = args.json + ".partial"
    env = {"machine": machine(device), "versions": versions(PACKAGES), "device": str(device)}
    print("  ".join(f"{k}={v}" for k, v in env["versions"].items()))
    preload(libraries)
    total = setup.ensemble + len(setup.seeds) * (1 + setup.subsets + setup.tuning_subsets)
    print(f"training/retraining up to {total} models (refits already in {cache} are read back)", flush=True)
    world = build_world(setup, device, cache)
    preload([])
    header, rows = run_rows(world, setup, methods, libraries, args.curvature)
    print()
    print(render(setup, world, header, rows, args.curvature))
    print()
    print(headline(rows))
    if args.json:
        payload = {
            **env,
            "setup": setup,
            "header": header,
            "noise_ceiling": noise_ceiling(world.retraining),
            "seconds": world.seconds,
            "rows": rows,
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["library"] == "influencer" and r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
