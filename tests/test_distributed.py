"""Work split over torch.distributed ranks (gloo, 2 CPU processes) equals one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA
from influencer._kernel.distributed import all_gather_blocks, rank_and_size, shard
from influencer.models import LogisticRegression
from influencer.training import train_lbfgs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_single_process_results(tmp_path: Path, digits):
    x, y = digits.x_train[:280], digits.y_train[:280]
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = train_lbfgs(LogisticRegression(64, 10).double(), task, (x[:250], y[:250]))
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    for k, v in model.state_dict().items():
        np.save(tmp_path / f"{k}.npy", v.numpy())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(Path(__file__).parent / "distributed_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    # each rank really did only its half of the training gradients
    for rank, block in ((0, range(0, 125)), (1, range(125, 250))):
        assert np.load(tmp_path / f"rank{rank}_local_ids.npy").tolist() == list(block)

    train, test = (x[:250], y[:250]), (x[250:], y[250:])
    single = {
        "cg": Influence(model, task, train, estimator=CG(tol=1e-10)).fit().scores(test),
        "lissa": Influence(model, task, train, estimator=LiSSA(depth=60, batch_size=50, damping=0.01))
        .fit()
        .scores(test),
    }
    exact = Influence(model, task, train, estimator=Exact()).fit()
    single["self"] = exact.self_influence()
    single["removal"] = exact.removal_params([1, 2, 200])
    single["up_params"] = exact.influence_up_params([0, 3, 101, 249])
    for name, expected in single.items():
        for rank in (0, 1):
            got = torch.from_numpy(np.load(tmp_path / f"rank{rank}_{name}.npy"))
            # Sharded sums round differently: allow round-off relative to the array's scale.
            atol = 1e-12 * float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=atol, msg=f"{name} on rank {rank}")


def test_without_a_process_group_everything_is_local():
    assert rank_and_size() == (0, 1)
    idx = torch.arange(7)
    assert torch.equal(shard(idx), idx)
    t = torch.ones(2, 3)
    assert all_gather_blocks(t, dim=1) is t
