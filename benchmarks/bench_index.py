"""The projected gradient store (influencer.index) vs exact-gradient influence, in training epochs.

An MLP on MNIST-1D signals (procedural, no download) is trained with Adam; one training epoch is
the time unit. For each method the script reports the time to get every test example's top-10
helpful/harmful training examples (build + query for the index; fit + scores for the exact-gradient
estimators), that time in epochs, and the agreement (mean over test examples of the Pearson
correlation across training examples) of its scores with exact-gradient Identity and EK-FAC scores.

    python benchmarks/bench_index.py --quick                      # smoke run, about a minute
    python benchmarks/bench_index.py --n 10000 --hidden 512,512   # p ~ 2.9e5
    python benchmarks/bench_index.py --n 10000 --hidden 1024,1024 --no-dense   # p ~ 1.1e6
    python benchmarks/bench_index.py --device cuda --n 50000 --hidden 1024,1024 --json out/index.json

Methods (``--kron`` and ``--dense`` choose the projections):

* ``exact identity`` / ``exact ekfac``: ``Influence(...).scores(test)`` with exact per-example gradients;
* ``kron a x b + fisher``: :class:`KroneckerProjector` (``k_in=a``, ``k_out=b`` per layer, its default
  PCA basis), queried with the projected Fisher, block-diagonal over layers (``ProjectedFisher``;
  ``--relative-damping``); the store keeps the whole Fisher (``fisher="full"``) for the next row;
* ``kron a x b + fisher-full``: the same store, the whole ``k x k`` projected Fisher;
* ``kron a x b + none``: the same store, projected gradient dot products;
* ``kron a x b + ekfac``: the same store, test gradients preconditioned by the fitted EK-FAC before
  projection (``EstimatorPreconditioner``; EK-FAC's fit is counted);
* ``gauss k + fisher``: a dense :class:`GaussianProjector`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from common import format_table, machine, stopwatch, versions, write_json

from influencer import EKFAC, ClassificationTask, Identity, Influence
from influencer.datasets import load_mnist1d
from influencer.index import (
    EstimatorPreconditioner,
    GaussianProjector,
    GradientIndex,
    KroneckerProjector,
    NoPreconditioner,
    ProjectedFisher,
)
from influencer.models import MLP
from influencer.training import train_minibatch


def row_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (test examples) of the Pearson correlation across columns (training examples)."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(r.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="training examples")
    parser.add_argument("--test", type=int, default=100, help="test examples")
    parser.add_argument("--hidden", default="512,512", help="MLP hidden widths")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (timed)")
    parser.add_argument("--kron", default="16x16,32x32,64x64", help="k_in x k_out per layer, comma-separated")
    parser.add_argument("--dense", default="256,1024", help="Gaussian projection dimensions")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense Gaussian projections")
    parser.add_argument("--no-before", action="store_true", help="skip EK-FAC before projection")
    parser.add_argument("--relative-damping", type=float, default=0.1)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256, help="per-example gradient batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.n, args.test, args.hidden, args.epochs = 2000, 20, "128,128", 2
        args.kron, args.dense = "8x8,16x16", "128"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hidden = tuple(int(h) for h in args.hidden.split(","))

    data = load_mnist1d(num_samples=int((args.n + args.test) / 0.8) + 10, dtype=torch.float32)
    x, y = data.x_train[: args.n].to(device), data.y_train[: args.n].to(device)
    test = (data.x_test[: args.test].to(device), data.y_test[: args.test].to(device))
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-4)
    model = MLP(x.shape[1], hidden, 10).to(device)
    train_minibatch(model, task, (x, y), epochs=args.epochs, lr=1e-3, batch_size=128, device=device)
    inf = Influence(model, task, (x, y), estimator=Identity(), batch_size=args.batch_size)
    print(f"MLP {hidden}: p = {inf.p:,}, n = {inf.n:,}, m = {args.test}", flush=True)

    def one_epoch() -> float:
        """Seconds of one training epoch (Adam, batches of 128) of a copy of the model, now."""
        with stopwatch(device) as t:
            train_minibatch(
                copy.deepcopy(model), task, (x, y), epochs=1, lr=1e-3, batch_size=128, device=device
            )
        return t["seconds"]

    rows: list[dict] = []
    group: list[dict] = []  # rows timed between the same two epoch measurements
    epoch_before = one_epoch()

    def record(method: str, k: int | None, seconds: float, scores: torch.Tensor, **parts: float) -> None:
        row = {"method": method, "k": k, "seconds": seconds, **parts}
        row["pearson_identity"] = row_pearson(scores, exact["identity"])
        row["pearson_ekfac"] = row_pearson(scores, exact["ekfac"])
        group.append(row)

    def close_group() -> None:
        # On a shared machine the speed drifts: each group is compared with epochs timed around it.
        nonlocal epoch_before
        epoch_after = one_epoch()
        epoch = 0.5 * (epoch_before + epoch_after)
        for row in group:
            row["epoch_seconds"], row["epochs"] = epoch, row["seconds"] / epoch
            rows.append(row)
            print(
                f"  {row['method']:28s} k={row['k']!s:>6}  {row['seconds']:8.1f} s = {row['epochs']:7.1f} "
                f"epochs (of {epoch:.2f} s)  r(identity)={row['pearson_identity']:.3f}  "
                f"r(ekfac)={row['pearson_ekfac']:.3f}",
                flush=True,
            )
        group.clear()
        epoch_before = epoch_after

    exact: dict[str, torch.Tensor] = {}
    with stopwatch(device) as t:
        exact["identity"] = inf.fit().scores(test)
    identity_s = t["seconds"]
    ekfac = inf.replace(estimator=EKFAC(relative_damping=args.relative_damping))
    with stopwatch(device) as t:
        ekfac.fit()
    ekfac_fit = t["seconds"]
    with stopwatch(device) as t:
        exact["ekfac"] = ekfac.scores(test)
    ekfac_s = ekfac_fit + t["seconds"]
    record("exact identity", None, identity_s, exact["identity"])
    record("exact ekfac", None, ekfac_s, exact["ekfac"], fit_s=ekfac_fit)
    close_group()

    projectors = []
    for spec in args.kron.split(","):
        a, b = (int(v) for v in spec.split("x"))
        projectors.append((f"kron {a}x{b}", KroneckerProjector(k_in=a, k_out=b)))
    if not args.no_dense:
        projectors += [(f"gauss {k}", GaussianProjector(k=int(k))) for k in args.dense.split(",")]
    for name, projector in projectors:
        with tempfile.TemporaryDirectory() as folder:
            with stopwatch(device) as t:
                index = GradientIndex.build(
                    inf, Path(folder) / "index", projector, chunk=args.chunk, fisher="full"
                )
            build = t["seconds"]
            rd = args.relative_damping
            choices = [("fisher", ProjectedFisher(relative_damping=rd)), ("none", NoPreconditioner())]
            if name.startswith("kron"):
                choices.append(("fisher-full", ProjectedFisher(relative_damping=rd, blocks="full")))
                if not args.no_before:
                    choices.append(("ekfac", EstimatorPreconditioner()))
            for label, pre in choices:
                fit = 0.0
                if label == "ekfac":
                    index = GradientIndex.open(index.path, ekfac)  # the fitted EK-FAC from above
                    fit = ekfac_fit
                with stopwatch(device) as t:
                    index.top_k(
                        test, 10, preconditioner=pre
                    )  # directions, then streamed scores and running top-k
                query = t["seconds"]
                scores = index.scores(test, preconditioner=pre)
                record(
                    f"{name} + {label}",
                    index.k,
                    build + fit + query,
                    scores,
                    build_s=build,
                    query_s=query,
                    fit_s=fit,
                )
                if label == "ekfac":
                    index = GradientIndex.open(index.path, inf)
        close_group()

    print()
    header = ["method", "k", "seconds", "epochs", "r(identity)", "r(ekfac)"]
    table = [
        [r["method"], r["k"], r["seconds"], r["epochs"], r["pearson_identity"], r["pearson_ekfac"]]
        for r in rows
    ]
    print(format_table(table, header))
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(device),
                "versions": versions(("influencer", "torch")),
                "settings": vars(args),
                "p": inf.p,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    sys.exit(main())
