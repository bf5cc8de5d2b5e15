"""Which check tells a good LiSSA solve from a bad one? Error against the exact solve, per depth.

For each model (trained to or near its optimum, float64), LiSSA at depths 2 .. 2000 (seed 0, so a
shorter run is the prefix of a longer one) solves ``(H + damping I) x = v`` for 16 test gradients.
Printed per depth: the true error of x against the exact solve (relative, worst column), the
scores' relative error and Pearson correlation against the exact scores, and the candidate checks:
``residual`` (``||(H + damping I) x - v|| / ||v||``, the rule up to now) and ``drift`` (``||x_J -
x_{J/2}|| / ||x_J||``, how much the second half of the series moved the answer).

    python -m reproductions.lissa_stopping

(``drift``, ``correction``: other candidates, not chosen; ``energy``: the estimate LiSSA now uses,
``sqrt(|r . c| / x^T A x)`` with ``c`` the same series run on the residual; ``true_energy``: the
same with the true error.) Run on 2026-12-06, 1 thread of a shared 2-core CPU, load average ~10;
the worst of 16 test columns (the solver checks 4). Selected rows (depth: score_err, residual,
energy estimate / true energy error):

=========================  ====================  ====================  ====================
model                      depth 2               depth 200             depth 1000 (default)
=========================  ====================  ====================  ====================
logreg, CLI job (p=21)     0.35, 0.45, 0.60/0.47 0.15, 0.27, 0.21/0.22 0.21, 0.44, 0.39/0.38
logreg-digits (p=650)      0.89, 0.64, 1.14/0.96 0.36, 1.08, 0.53/0.53 0.26, 1.04, 0.30/0.33
mlp-mnist1d (p=3274)       0.93, 0.86, 2.32/0.96 0.51, 0.76, 0.48/0.58 0.41, 1.13, 0.56/0.54
mlp-digits (p=2410)        0.87, 0.62, 1.14/0.96 0.33, 0.96, 0.46/0.49 0.22, 0.77, 0.32/0.33
cnn-digits, GN (p=1360)    1.01, 0.79, 1.68/0.98 0.64, 1.35, 0.68/0.70 0.29, 1.43, 0.48/0.41
=========================  ====================  ====================  ====================

The residual does not order the answers by their error (0.45 at 35% off, 1.43 at 29% off); the
estimate does, within 25% of the true error from depth 200 on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from influencer import ClassificationTask, Exact, Influence, LiSSA
from influencer.datasets import load_digits
from influencer.models import SmallCNN
from influencer.training import train_minibatch

DAMPING = 1e-3
DEPTHS = (2, 10, 50, 200, 1000, 3000)
ROOT = Path(__file__).resolve().parent.parent


def models():
    """(name, model, task, data as (train, test), curvature): the benchmarks' problems (trained to
    grad J ~ 0 in float64) and the command line's small test job."""
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from common import ProblemSpec, make_problem

    import robust_jobs

    job = robust_jobs.build()
    task, model, train, test = job["task"], job["model"], job["train"], job["test"]
    yield "logreg-robust-job", model, task, (train, test), "hessian"
    specs = [
        ProblemSpec("logreg-digits", hidden=(), weight_decay=1e-3, n_test=16),
        ProblemSpec("mlp-mnist1d", dataset="mnist1d", hidden=(64,), weight_decay=1e-2, n_test=16),
        ProblemSpec("mlp-digits", hidden=(32,), weight_decay=1e-2, n_test=16),
    ]
    for spec in specs:
        problem = make_problem(spec)
        yield spec.name, problem.model, problem.task, (problem.train, problem.test), "hessian"
    digits = load_digits(dtype=torch.float64)
    images = (digits.x_train.reshape(-1, 1, 8, 8), digits.y_train)
    torch.manual_seed(0)
    cnn = SmallCNN(10, channels=6).double()
    task = ClassificationTask(weight_decay=1e-2)
    train_minibatch(cnn, task, images, epochs=20, lr=1e-2, batch_size=32)
    test = (digits.x_test[:16].reshape(-1, 1, 8, 8), digits.y_test[:16])
    yield "cnn-digits (gauss-newton)", cnn, task, (images, test), "gauss_newton"


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    skip = sys.argv[2].split(",") if len(sys.argv) > 2 else []
    for name, model, task, data, curvature in models():
        if name.split()[0] in skip:
            continue
        train, test = data
        exact = Influence(model, task, train, estimator=Exact(damping=DAMPING), curvature=curvature).fit()
        test = (test[0][:16], test[1][:16])
        v = exact.gradients(test)
        try:
            x_star = exact.inverse_hvp(v)
        except Exception as exc:  # an indefinite Hessian: nothing to compare with
            print(f"{name}: exact solve refused ({type(exc).__name__})")
            continue
        g = torch.cat([x for _, x in exact.train_gradients()])  # (n, p)
        s_star = x_star @ g.T
        print(f"\n{name}: n={exact.n} p={exact.p} damping={DAMPING:g} curvature={curvature}")
        print("depth   x_err  score_err  corr     residual  drift   correction  energy  true_energy")
        previous = {}
        for depth in DEPTHS:
            est = LiSSA(damping=DAMPING, depth=depth, on_unconverged="warn", tol=1e9)
            inf = Influence(model, task, train, estimator=est, curvature=curvature).fit()
            x = inf.inverse_hvp(v)
            previous[depth] = x
            half = previous.get(depth // 2)
            if half is None and depth // 2 >= 1:
                est_h = LiSSA(damping=DAMPING, depth=depth // 2, on_unconverged="warn", tol=1e9)
                half = (
                    Influence(model, task, train, estimator=est_h, curvature=curvature).fit().inverse_hvp(v)
                )
            ax = exact.curvature_product(x) + DAMPING * x
            r = ax - v
            c = inf.inverse_hvp(r)
            correction = float((c.norm(dim=1) / x.norm(dim=1)).max())
            energy = float(((r * c).sum(1).abs() / (x * ax).sum(1).abs()).sqrt().max())
            e = x - x_star
            ae = exact.curvature_product(e) + DAMPING * e
            true_energy = float(((e * ae).sum(1) / (x_star * v).sum(1)).sqrt().max())
            s = x @ g.T
            x_err = float(((x - x_star).norm(dim=1) / x_star.norm(dim=1)).max())
            s_err = float((s - s_star).norm() / s_star.norm())
            corr = float(torch.corrcoef(torch.stack([s.flatten(), s_star.flatten()]))[0, 1])
            drift = float(((x - half).norm(dim=1) / x.norm(dim=1)).max())
            res = float((r.norm(dim=1) / v.norm(dim=1)).max())
            print(
                f"{depth:5d}  {x_err:6.3f}  {s_err:8.3f}  {corr:6.4f}  {res:8.3f}  {drift:6.3f}  "
                f"{correction:6.3f}  {energy:6.3f}  {true_energy:6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
