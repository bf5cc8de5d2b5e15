"""Which estimator for which model size: the default's choice against the alternatives, timed.

Four models, each trained briefly here in float64 (nothing is downloaded):

* ``logreg-digits``: multinomial logistic regression on scikit-learn's digits (p = 650), L-BFGS to
  the optimum (convex, weight decay 1e-3);
* ``mlp-digits``: MLP 64-32-10 with tanh on digits (p = 2,410), Adam;
* ``cnn-digits``: :class:`influencer.models.SmallCNN` on the 8x8 digit images (p = 5,050), Adam;
* ``bert-tiny``: a 2-layer BERT sequence classifier (hidden 32) built from a ``transformers`` config,
  trained with Adam on the generated review sentences of ``reproductions/hf_text_influence.py``.

For each model, one row per method: ``Influence(model, task, train, ...)`` built, ``fit()``, and
``scores`` of ``--n-test`` test examples against every training example, timed together:

* ``default``: no estimator (:func:`influencer.choose_estimator` decides; its choice is recorded);
* ``exact``: ``Exact(damping)`` on the Gauss-Newton matrix, where p <= ``--exact-max`` (6,000);
* ``cg``: ``CG(damping, tol)`` on the Gauss-Newton matrix (the reference for the agreement column:
  the answer ``exact`` would give, without the dense matrix);
* ``ekfac``: ``EKFAC(relative_damping=0.1)``, ``params="supported"`` where some parameters are not
  in a Linear/Conv layer (BERT's embeddings and LayerNorms);
* ``arnoldi``: ``Arnoldi(damping, rank 50, 100 iterations)`` on the Gauss-Newton matrix.

``pearson_cg``: Pearson correlation of the row's scores with CG's over all test x training pairs
(the methods differ in damping and, for EK-FAC, in the parameters they cover, so this says how
far each default lands from the damped Gauss-Newton answer, not an error).

    PYTHONPATH=src python benchmarks/bench_defaults.py --threads 1 --out out/bench_defaults.json
    PYTHONPATH=src python benchmarks/bench_defaults.py --models logreg-digits,mlp-digits --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import format_table, machine, pearson, stopwatch, versions, write_json
from torch import nn

from influencer import CG, EKFAC, Arnoldi, ClassificationTask, Exact, Influence, Task
from influencer.datasets import load_digits
from influencer.models import MLP, LogisticRegression, SmallCNN
from influencer.training import train_lbfgs, train_minibatch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Model:
    """A trained float64 model with its task and data."""

    name: str
    model: nn.Module
    task: Task
    train: Any
    test: Any
    train_seconds: float

    @property
    def p(self) -> int:
        return sum(q.numel() for q in self.model.parameters() if q.requires_grad)

    @property
    def n(self) -> int:
        return len(self.train["labels"]) if isinstance(self.train, dict) else len(self.train[1])


def digits_model(name: str, n_test: int, seed: int, epochs: int) -> Model:
    split = load_digits(images=name == "cnn-digits", dtype=torch.float64, seed=seed)
    train, test = split.train, (split.x_test[:n_test], split.y_test[:n_test])
    task = ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if name == "logreg-digits":
        model = LogisticRegression(64, 10).double()
        train_lbfgs(model, task, train, grad_tol=1e-10)
    else:
        model = (MLP(64, (32,), 10) if name == "mlp-digits" else SmallCNN()).double()
        train_minibatch(model, task, train, epochs=epochs, lr=1e-2, batch_size=64, seed=seed)
    return Model(name, model, task, train, test, time.perf_counter() - start)


def bert_model(n_train: int, n_test: int, seed: int, epochs: int) -> Model:
    sys.path.insert(0, str(REPO))  # the reproduction's sentences, vocabulary and model
    from influencer.tasks import SequenceClassificationTask
    from reproductions.hf_text_influence import build_model, make_data

    _, train, _, _, test = make_data(n_train, n_test, flip=0.0, seed=seed)
    model = build_model(seed).double()
    task = SequenceClassificationTask()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(bos|eos|pad)_token_id.*")
        train_minibatch(model, task, train, epochs=epochs, lr=2e-3, batch_size=32, seed=seed)
    return Model("bert-tiny", model, task, train, test, time.perf_counter() - start)


def methods(m: Model, args: argparse.Namespace) -> dict[str, Callable[[], Influence]]:
    """The rows for one model: each builds its Influence (construction is timed too)."""
    d = args.damping
    gn: dict[str, Any] = {"curvature": "gauss_newton"}
    has_unsupported = any(
        not isinstance(mod, (nn.Linear, nn.Conv2d))
        for mod in m.model.modules()
        if any(q.requires_grad for q in mod.parameters(recurse=False))
    )
    ekfac_params = "supported" if has_unsupported else None
    rows: dict[str, Callable[[], Influence]] = {
        "default": lambda: Influence(m.model, m.task, m.train),
    }
    if m.p <= args.exact_max:
        rows["exact"] = lambda: Influence(m.model, m.task, m.train, estimator=Exact(damping=d), **gn)
    rows["cg"] = lambda: Influence(
        m.model, m.task, m.train, estimator=CG(damping=d, tol=args.cg_tol, on_unconverged="warn"), **gn
    )
    rows["ekfac"] = lambda: Influence(
        m.model, m.task, m.train, estimator=EKFAC(relative_damping=0.1), params=ekfac_params
    )
    rows["arnoldi"] = lambda: Influence(
        m.model, m.task, m.train, estimator=Arnoldi(damping=d, rank=50, iterations=100), **gn
    )
    return rows


def chosen(inf: Influence) -> str:
    """The default's choice in a few words (the full reason goes to the JSON)."""
    est = inf.estimator.settings()
    name = est["inner"]["estimator"] if est["estimator"] == "spectral_damping" else est["estimator"]
    label = {"exact": "Exact", "exact_or_cg": "ExactOrCG", "ekfac": "EK-FAC", "cg": "CG"}.get(name, name)
    damping = inf.solver.info.get("damping", est.get("damping"))
    parts = [label, "Hessian" if inf.curvature_kind == "hessian" else "Gauss-Newton"]
    if est["estimator"] == "ekfac":
        parts.append(f"{est['fisher']} Fisher, damping {est['relative_damping']:g} x mean eigenvalue")
    elif isinstance(damping, (int, float)):
        parts.append("undamped" if damping == 0 else f"damping {damping:.2g}")
    p = inf.p
    total = sum(q.numel() for q in inf.fn.model.parameters() if q.requires_grad)
    if p < total:
        parts.append(f"{p:,} of {total:,} parameters")
    return ", ".join(parts)


def run_one(make: Callable[[], Influence], test: Any, repeats: int) -> dict[str, Any]:
    best, scores, inf, caught = float("inf"), None, None, []
    for _ in range(repeats):
        with warnings.catch_warnings(record=True) as record, stopwatch(torch.device("cpu")) as t:
            warnings.simplefilter("always")
            inf = make()
            scores = inf.fit().scores(test)  # (n_test, n_train)
        best = min(best, t["seconds"])
        caught = [str(w.message).split("\n")[0][:200] for w in record if issubclass(w.category, UserWarning)]
        caught += [str(w.message)[:200] for w in record if issubclass(w.category, RuntimeWarning)]
    assert inf is not None and scores is not None
    return {"seconds": best, "scores": scores, "inf": inf, "warnings": caught}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="logreg-digits,mlp-digits,cnn-digits,bert-tiny")
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--bert-train", type=int, default=400, help="training sentences for bert-tiny")
    ap.add_argument("--epochs", type=int, default=10, help="Adam epochs for the networks")
    ap.add_argument("--damping", type=float, default=1e-3, help="for exact, cg and arnoldi")
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--exact-max", type=int, default=6000, help="largest p for the exact row")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs per row")
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows and settings to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)

    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name == "bert-tiny":
            m = bert_model(args.bert_train, args.n_test, args.seed, args.epochs)
        elif name in ("logreg-digits", "mlp-digits", "cnn-digits"):
            m = digits_model(name, args.n_test, args.seed, args.epochs)
        else:
            raise SystemExit(f"unknown model {name!r}")
        print(f"{m.name}: p = {m.p:,}, n = {m.n:,}, trained in {m.train_seconds:.1f} s", flush=True)
        results = {}
        for method, make in methods(m, args).items():
            results[method] = run_one(make, m.test, args.repeats)
            print(f"  {method:<8} {results[method]['seconds']:8.2f} s", flush=True)
        default = results["default"]["inf"]
        short = chosen(default)
        models.append(
            {
                "model": m.name,
                "p": m.p,
                "n": m.n,
                "train_seconds": m.train_seconds,
                "default": short,
                "default_reason": default.choice.reason,
                "default_estimator": default.estimator.settings(),
                "default_curvature": default.curvature_kind,
            }
        )
        reference = results["cg"]["scores"].flatten()
        for method, r in results.items():
            inf = r["inf"]
            rows.append(
                {
                    "model": m.name,
                    "p": m.p,
                    "n": m.n,
                    "method": method,
                    "p_used": inf.p,
                    "seconds": r["seconds"],
                    "pearson_cg": pearson(r["scores"].flatten(), reference),
                    "default_chose": short if method == "default" else "",
                    "solver_info": {k: v for k, v in inf.solver.info.items() if isinstance(v, (int, float))},
                    "warnings": r["warnings"],
                }
            )

    load = os.getloadavg()
    print(f"\nfloat64, {args.threads} thread(s), best of {args.repeats}; load average {load[0]:.1f}")
    header = ["model", "p", "n", "method", "seconds", "pearson vs CG", "default chose"]
    table = [
        [
            r["model"],
            f"{r['p']:,}",
            f"{r['n']:,}",
            r["method"],
            f"{r['seconds']:.2f}",
            f"{r['pearson_cg']:.3f}",
            r["default_chose"],
        ]
        for r in rows
    ]
    print(format_table(table, header, align="lrrlrrl"))
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for line in table:
        print("| " + " | ".join(line) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(
            args.out,
            {
                "settings": vars(args),
                "load_average": load,
                "machine": machine(torch.device("cpu")),
                "versions": versions(["torch", "transformers", "influencer"]),
                "models": models,
                "rows": rows,
            },
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
