"""Run under torchrun by test_index_distributed.py: a gradient index built and queried by 2 ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from influencer import ClassificationTask, Influence
from influencer.index import GradientIndex, KroneckerProjector, NoPreconditioner, ProjectedFisher
from influencer.models import MLP


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = torch.from_numpy(np.load(folder / "x.npy")), torch.from_numpy(np.load(folder / "y.npy"))
    model = MLP(64, (12,), 10).double()
    model.load_state_dict({k: torch.from_numpy(np.load(folder / f"{k}.npy")) for k in model.state_dict()})
    train, test = (x[:300], y[:300]), (x[300:], y[300:])
    inf = Influence(model, ClassificationTask(weight_decay=1e-3), train, batch_size=32, distributed=True)
    written: list[int] = []
    index = GradientIndex.build(
        inf, folder / "shared", KroneckerProjector(k_in=8, k_out=5), chunk=40, on_chunk=written.append
    )
    (folder / f"rank{rank}_written.json").write_text(json.dumps(written))
    results = {}
    for name, pre in (("fisher", ProjectedFisher()), ("plain", NoPreconditioner())):
        top = index.top_k(test, 6, block=7, preconditioner=pre, checkpoint=folder / f"query_{name}")
        results[f"{name}_helpful_ids"] = top.helpful_ids
        results[f"{name}_helpful_scores"] = top.helpful_scores
        results[f"{name}_harmful_ids"] = top.harmful_ids
        results[f"{name}_harmful_scores"] = top.harmful_scores
    results["scores"] = index.scores(test)
    results["self"] = index.self_influence()
    for name, value in results.items():
        np.save(folder / f"rank{rank}_{name}.npy", value.numpy())
    # Both ranks done before teardown: gloo aborts a rank whose peer tears down mid-exchange.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
