"""K-FAC scores in layer form against the dense solve, and the factors' symmetric Gram updates.

``Influence.scores`` with a K-FAC solver solves the test gradients' layer rows as a few rank-one
terms per layer (``KroneckerSolver.solve_rows``) where that is at least twice cheaper than the dense
block, and keeps dense blocks elsewhere; ``Influence.scores_from_directions(test_directions(...))``
is the dense path (``(m, p)`` directions). For MLPs ``64 -> w -> w -> 10`` on the digits (float64,
untrained: the cost and the agreement do not depend on training; K-FAC, damping 1e-3), each row
gives, at a required gain (``--gains``: the factored form replaces a dense block only where it takes
at most 1/gain of its multiplications; 2 as used, 1 to time the closer calls), the layers' form
(``R``: rank-one terms per test example, or ``dense``), the best of
``--repeats`` times of each path for ``--tests`` test examples against every training image, and
the largest difference over the largest score. ``--wide`` adds the ``512 -> 768 -> 768 -> 10``
network of ``bench_estimators.py``'s p = 1e6 problem on 3,000 Gaussian examples (10 tests).

``--gram`` times one Gram update of a ``(512, 769)`` float64 block (a K-FAC factor's batch) three
ways: the full product, the blocks on and above the diagonal in pieces of 160 columns on unaligned
edges, and in the pieces ``_kernel/gram.py`` uses (192 columns, edges on multiples of 32)::

    python benchmarks/bench_kfac_layer_form.py --threads 1 --wide --gram --json out/kfac_layer_form.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import format_table, machine, versions, write_json
from torch import nn


def best(f: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The shortest of ``repeats`` timed calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    return min(times), out


def compare(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int, repeats: int, gain: float
) -> dict:
    from influencer.estimators import kronecker

    saved, kronecker._FACTORED_GAIN = kronecker._FACTORED_GAIN, gain
    try:
        return _compare(name, model, x, y, m, repeats) | {"gain": gain}
    finally:
        kronecker._FACTORED_GAIN = saved


def _compare(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int, repeats: int) -> dict:
    from influencer import KFAC, ClassificationTask, Influence

    inf = Influence(
        model.double(), ClassificationTask(weight_decay=1e-3), (x, y), estimator=KFAC(damping=1e-3)
    )
    inf = inf.fit()
    test = (x[:m], y[:m])
    solved = inf.solver.solve_rows(inf._test_rows(test))
    form = [
        "dense" if solved.dense_block(i) is not None else str(solved.acts[i][0].shape[1])
        for i in range(len(inf.solver.layers))
    ]
    layer_s, got = best(lambda: inf.scores(test), repeats)
    dense_s, want = best(lambda: inf.scores_from_directions(inf.test_directions(test)), repeats)
    err = float((got - want).abs().max() / want.abs().max())
    return {"network": name, "p": inf.p, "n": inf.n, "tests": m, "layers": form, "layer_form_s": layer_s,
            "dense_s": dense_s, "rel_diff": err}  # fmt: skip


def gram_times(repeats: int) -> list[dict]:
    from influencer._kernel import gram

    x = torch.randn(512, 769, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(769, 769, dtype=torch.float64)
    rows = [{"update": "full product", "s": best(lambda: out.addmm_(x.T, x), repeats)[0]}]
    for label, piece, align in (
        ("upper blocks, 160 columns, unaligned", 160, 1),
        ("upper blocks, as used", None, None),
    ):
        saved = gram.PIECE, gram.ALIGN
        gram.PIECE, gram.ALIGN = (piece, align) if piece else saved
        try:
            edges = gram.pieces(769)
            seconds = best(lambda: gram.add_upper_gram(out, x), repeats)[0]
        finally:
            gram.PIECE, gram.ALIGN = saved
        rows.append({"update": f"{label} {edges}", "s": seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="32,64,128")
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--gains",
        default="2,1",
        help="the factored form's required gain (estimators.kronecker._FACTORED_GAIN: 2 as used; 1 factors "
        "every layer where it saves anything)",
    )
    parser.add_argument("--wide", action="store_true", help="also the 512-768-768-10 network")
    parser.add_argument("--gram", action="store_true", help="also time the Gram updates")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from influencer.datasets import load_digits

    env = {"machine": machine(torch.device("cpu")), "versions": versions(("influencer", "torch"))}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()), flush=True)
    d = load_digits(dtype=torch.float64)
    gains = [float(g) for g in args.gains.split(",")]
    rows = []
    for w in (int(v) for v in args.widths.split(",")):
        for gain in gains:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
            rows.append(compare(f"64-{w}-{w}-10", net, d.x_train, d.y_train, args.tests, args.repeats, gain))
    if args.wide:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(512, 768), nn.Tanh(), nn.Linear(768, 768), nn.Tanh(), nn.Linear(768, 10)
        )
        x = torch.randn(3000, 512, dtype=torch.float64)
        rows.append(compare("512-768-768-10", net, x, torch.randint(0, 10, (3000,)), 10, 1, gains[0]))
    header = [
        "network",
        "p",
        "n",
        "tests",
        "gain",
        "layers (R or dense)",
        "layer form s",
        "dense s",
        "rel diff",
    ]
    keys = ("network", "p", "n", "tests", "gain", "layers", "layer_form_s", "dense_s", "rel_diff")
    table = [[" / ".join(r[k]) if k == "layers" else r[k] for k in keys] for r in rows]
    print(format_table(table, header))
    grams = gram_times(max(args.repeats, 20)) if args.gram else []
    if grams:
        print()
        print(
            format_table([[g["update"], g["s"]] for g in grams], ["Gram update of (512, 769), float64", "s"])
        )
    if args.json:
        write_json(args.json, {**env, "args": vars(args), "rows": rows, "gram": grams})
    return 0


if __name__ == "__main__":
    sys.exit(main())
