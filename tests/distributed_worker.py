"""Run under torchrun by test_distributed.py: influence with the work split between ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA
from influencer.models import LogisticRegression


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = torch.from_numpy(np.load(folder / "x.npy")), torch.from_numpy(np.load(folder / "y.npy"))
    model = LogisticRegression(64, 10).double()
    model.load_state_dict({k: torch.from_numpy(np.load(folder / f"{k}.npy")) for k in ("weight", "bias")})
    task = ClassificationTask(weight_decay=1e-2)
    train, test = (x[:250], y[:250]), (x[250:], y[250:])
    results = {
        "cg": Influence(model, task, train, estimator=CG(tol=1e-10), distributed=True).fit().scores(test),
        "lissa": Influence(
            model, task, train, estimator=LiSSA(depth=60, batch_size=50, damping=0.01), distributed=True
        )
        .fit()
        .scores(test),
    }
    exact = Influence(model, task, train, estimator=Exact(), distributed=True, batch_size=16).fit()
    results["self"] = exact.self_influence()
    results["removal"] = exact.removal_params([1, 2, 200])
    results["up_params"] = exact.influence_up_params([0, 3, 101, 249])
    results["local_ids"] = torch.cat([ids for ids, _ in exact.train_gradients()])
    for name, value in results.items():
        np.save(folder / f"rank{rank}_{name}.npy", value.numpy())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
