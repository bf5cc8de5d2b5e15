"""Scale-out over ``torch.distributed``: split the examples between processes, combine the sums.

Each process (rank) holds the model and can read the whole data set; influence work is divided by
example. With ``Influence(..., distributed=True)`` inside an initialised process group (e.g. under
``torchrun``, any backend: ``gloo`` on CPUs, ``nccl`` on GPUs):

* Hessian-vector products (CG, Arnoldi, Exact's dense H, power iteration) sum each rank's share of
  the Hessian examples with one ``all_reduce`` per product;
* LiSSA's minibatches are drawn identically on every rank (same seed) and split between them;
* training-gradient chunks are split between ranks, and scores are gathered so that every rank
  returns the same ``(m, n)`` result as a single process would.

Without an initialised process group everything runs locally, so the same script runs anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def shard(indices: Tensor) -> Tensor:
    """This rank's contiguous block of ``indices`` (blocks differ in size by at most one)."""
    rank, size = rank_and_size()
    bounds = [len(indices) * r // size for r in range(size + 1)]
    return indices[bounds[rank] : bounds[rank + 1]]


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if active():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks, in place; ``t`` unchanged when not distributed."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_blocks(local: Tensor, dim: int) -> Tensor:
    """Concatenate every rank's block of ``local`` along ``dim``, in rank order (sizes may differ)."""
    if not active():
        return local
    _, size = rank_and_size()
    length = torch.tensor([local.shape[dim]], device=local.device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    pad = list(local.shape)
    pad[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim)  # all_gather needs equal shapes
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, int(n)) for p, n in zip(parts, lengths, strict=True)], dim=dim)
