"""Work split over torch.distributed ranks (gloo, 2 CPU processes) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA
from influencer._kernel.distributed import all_gather_blocks, rank_and_size, shard
from influencer.models import LogisticRegression
from influencer.training import train_lbfgs
from influencer.uses.group import group_influence, group_params


def run_two_ranks(worker: str, folder: Path) -> None:
    """Run ``tests/<worker> <folder>`` on two gloo CPU ranks under torchrun; fail with its stderr.

    ``--standalone`` lets the rendezvous pick a free port itself (no race with other processes).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).parent / worker),
        str(folder),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_give_the_single_process_results(tmp_path: Path, digits):
    x, y = digits.x_train[:280], digits.y_train[:280]
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = train_lbfgs(LogisticRegression(64, 10).double(), task, (x[:250], y[:250]))
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    for k, v in model.state_dict().items():
        np.save(tmp_path / f"{k}.npy", v.numpy())
    run_two_ranks("distributed_worker.py", tmp_path)

    # each rank really did only its half of the training gradients
    for rank, block in ((0, range(0, 125)), (1, range(125, 250))):
        assert np.load(tmp_path / f"rank{rank}_local_ids.npy").tolist() == list(block)
    # ... and of the curvature products: CG fit + scores push at most 60% of the single-process
    # examples through the model on each rank (half, plus the test gradients every rank needs)
    for rank in (0, 1):
        pushed = json.loads((tmp_path / f"rank{rank}_pushed.json").read_text())
        assert pushed["distributed"] <= 0.6 * pushed["single"], pushed

    train, test = (x[:250], y[:250]), (x[250:], y[250:])
    cg = Influence(model, task, train, estimator=CG(tol=1e-10)).fit()
    lissa = Influence(model, task, train, estimator=LiSSA(depth=100, batch_size=50, damping=0.01)).fit()
    exact = Influence(model, task, train, estimator=Exact()).fit()
    groups = [list(range(0, 40)), [5, 17, 130, 131, 240], list(range(100, 200))]
    single = {
        "cg": cg.scores(test),
        "lissa": lissa.scores(test),
        "self": exact.self_influence(),
        "removal": exact.removal_params([1, 2, 200]),
        "up_params": exact.influence_up_params([0, 3, 101, 249]),
        "group_first": group_influence(exact, groups, test).first_order,
        "group_second": group_influence(exact, groups, test).second_order,
        "group_params": group_params(exact, groups).second_order,
        "gradient_sum": exact.gradient_sum(list(range(0, 250, 3))),
        "curvature_product": exact.curvature_product(torch.eye(650, dtype=torch.float64)[:7], [3, 4, 240]),
    }
    for name, expected in single.items():
        for rank in (0, 1):
            got = torch.from_numpy(np.load(tmp_path / f"rank{rank}_{name}.npy"))
            # Sharded sums round differently, so compare relative to the array's scale: to
            # round-off for direct computations, to the solver's tolerance (1e-10) for CG.
            scale = float(expected.abs().max())
            tol = 1e-9 if name == "cg" else 1e-12
            torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale, msg=f"{name} on rank {rank}")
            assert float((got - expected).abs().max()) / scale < 1e-6


def test_without_a_process_group_everything_is_local():
    assert rank_and_size() == (0, 1)
    idx = torch.arange(7)
    assert torch.equal(shard(idx), idx)
    t = torch.ones(2, 3)
    assert all_gather_blocks(t, dim=1) is t
