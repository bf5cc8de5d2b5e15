"""A gradient index built and queried by 2 gloo ranks equals the single-process one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from influencer import Influence
from influencer.index import GradientIndex, KroneckerProjector, NoPreconditioner, ProjectedFisher, QueryResult
from test_distributed import run_two_ranks


@pytest.mark.slow
def test_two_ranks_build_and_query_like_one_process(tmp_path: Path, digits_small, mlp_small, one_thread):
    model, task = mlp_small
    x = torch.cat([digits_small.x_train, digits_small.x_test])
    y = torch.cat([digits_small.y_train, digits_small.y_test])
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    for k, v in model.state_dict().items():
        np.save(tmp_path / f"{k}.npy", v.numpy())
    run_two_ranks("index_distributed_worker.py", tmp_path)

    # each rank wrote its own contiguous block of the 8 chunks (with the PCA basis fitted by both)
    assert json.loads((tmp_path / "rank0_written.json").read_text()) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "rank1_written.json").read_text()) == [4, 5, 6, 7]

    inf = Influence(model, task, digits_small.train, batch_size=32)
    single = GradientIndex.build(inf, tmp_path / "single", KroneckerProjector(k_in=8, k_out=5), chunk=40)
    shared = GradientIndex.open(tmp_path / "shared", inf, verify=True)
    for j in range(8):  # the stored gradients are the same bytes
        assert (tmp_path / "shared" / "chunks" / f"{j:06d}.npy").read_bytes() == (
            tmp_path / "single" / "chunks" / f"{j:06d}.npy"
        ).read_bytes()
    # the PCA basis and the Fisher are summed over ranks in another order: equal to round-off
    for name in ("basis", "regularizer"):
        got, want = (np.load(tmp_path / where / f"{name}.npy") for where in ("shared", "single"))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    torch.testing.assert_close(shared.fisher(), single.fisher(), rtol=1e-12, atol=0)

    test = digits_small.test
    expected = {"scores": single.scores(test), "self": single.self_influence()}
    for name, pre in (("fisher", ProjectedFisher()), ("plain", NoPreconditioner())):
        top = single.top_k(test, 6, block=7, preconditioner=pre)
        stored = QueryResult.open(tmp_path / f"query_{name}").top_k()  # written by rank 0
        for field in ("helpful_ids", "helpful_scores", "harmful_ids", "harmful_scores"):
            expected[f"{name}_{field}"] = getattr(top, field)
            assert torch.equal(
                getattr(stored, field), torch.from_numpy(np.load(tmp_path / f"rank0_{name}_{field}.npy"))
            )
    for name, want in expected.items():
        for rank in (0, 1):
            got = torch.from_numpy(np.load(tmp_path / f"rank{rank}_{name}.npy"))
            if name.endswith("_ids"):
                assert torch.equal(got, want), f"{name} on rank {rank}"
            else:
                scale = float(want.abs().max())
                torch.testing.assert_close(
                    got, want, rtol=0, atol=1e-10 * scale, msg=f"{name} on rank {rank}"
                )
