"""Run under torchrun by test_distributed.py: influence with the work split between ranks."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA
from influencer._kernel.data import batch_size_of
from influencer._kernel.functional import ModelFunction
from influencer.models import LogisticRegression
from influencer.uses.group import group_influence, group_params

# Examples pushed through the model by this process: each per-example gradient counts once, each
# curvature product once per example and right-hand side (a product of a linearised batch included).
PUSHED = {"examples": 0}


def _counting(method, per_vector: bool):
    @functools.wraps(method)
    def wrapper(self, theta, batch, *args):
        vectors = args[0].reshape(-1, theta.numel()).shape[0] if per_vector else 1
        PUSHED["examples"] += batch_size_of(batch) * vectors
        return method(self, theta, batch, *args)

    return wrapper


def _counting_linearize(method):
    @functools.wraps(method)
    def wrapper(self, theta, batch, *args, **kwargs):
        linear = method(self, theta, batch, *args, **kwargs)
        apply, rows = linear._apply, batch_size_of(batch)

        def counted(vectors):
            PUSHED["examples"] += rows * vectors.reshape(-1, theta.numel()).shape[0]
            return apply(vectors)

        linear._apply = counted
        return linear

    return wrapper


for _name, _per_vector in (
    ("hvp", True),
    ("ggn_vp", True),
    ("loss_grads", False),
    ("example_loss_grads", False),
    ("measurement_grads", False),
):
    setattr(ModelFunction, _name, _counting(getattr(ModelFunction, _name), _per_vector))
ModelFunction.linearize = _counting_linearize(ModelFunction.linearize)


def pushed_by(run) -> int:
    PUSHED["examples"] = 0
    run()
    return PUSHED["examples"]


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = torch.from_numpy(np.load(folder / "x.npy")), torch.from_numpy(np.load(folder / "y.npy"))
    model = LogisticRegression(64, 10).double()
    model.load_state_dict({k: torch.from_numpy(np.load(folder / f"{k}.npy")) for k in ("weight", "bias")})
    task = ClassificationTask(weight_decay=1e-2)
    train, test = (x[:250], y[:250]), (x[250:], y[250:])

    def cg(distributed: bool) -> torch.Tensor:
        return (
            Influence(model, task, train, estimator=CG(tol=1e-10), distributed=distributed).fit().scores(test)
        )

    counts = {"single": pushed_by(lambda: cg(False)), "distributed": pushed_by(lambda: cg(True))}
    (folder / f"rank{rank}_pushed.json").write_text(json.dumps(counts))

    results = {
        "cg": cg(True),
        "lissa": Influence(
            model, task, train, estimator=LiSSA(depth=100, batch_size=50, damping=0.01), distributed=True
        )
        .fit()
        .scores(test),
    }
    exact = Influence(model, task, train, estimator=Exact(), distributed=True, batch_size=16).fit()
    results["self"] = exact.self_influence()
    results["removal"] = exact.removal_params([1, 2, 200])
    results["up_params"] = exact.influence_up_params([0, 3, 101, 249])
    groups = [list(range(0, 40)), [5, 17, 130, 131, 240], list(range(100, 200))]
    results["group_first"] = group_influence(exact, groups, test).first_order
    results["group_second"] = group_influence(exact, groups, test).second_order
    results["group_params"] = group_params(exact, groups).second_order
    results["gradient_sum"] = exact.gradient_sum(list(range(0, 250, 3)))
    results["curvature_product"] = exact.curvature_product(
        torch.eye(650, dtype=torch.float64)[:7], [3, 4, 240]
    )
    results["local_ids"] = torch.cat([ids for ids, _ in exact.train_gradients()])
    for name, value in results.items():
        np.save(folder / f"rank{rank}_{name}.npy", value.numpy())
    # Both ranks done before teardown: gloo aborts a rank whose peer tears down mid-exchange.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
