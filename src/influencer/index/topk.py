"""Running top-k over streamed score blocks, with a deterministic order for ties.

Order of the helpful list: score descending, then training id ascending; of the harmful list:
score ascending, then id ascending. Blocks arrive in increasing id order and each running list is
kept in that order, so a *stable* sort of ``[running, new block]`` by score alone yields exactly
it: among equal scores the running entries (smaller ids, already id-ordered) stay first, then the
block's in column (id) order. Merging per-rank candidates in rank order works the same way,
since ranks hold increasing id ranges. The result equals a stable sort of the full score row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from influencer._kernel.scores import TopK, check_finite_scores


def merge(values: Tensor, ids: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The first ``k`` columns of ``(values, ids)`` ``(m, c)`` after a stable sort of ``values``."""
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, order), ids.gather(1, order)


def preselect(scores: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Columns of ``scores`` ``(m, c)`` that can enter a top-``k`` list, in column order: ``(values, cols)``.

    Usually the block's own top ``k`` (an ``O(c)`` selection instead of a sort); when some row has
    ties at its ``k``-th value, which ``topk`` would break arbitrarily, every column is kept.
    """
    m, c = scores.shape
    every = torch.arange(c, device=scores.device).expand(m, -1)
    if c <= k:
        return scores, every
    values, cols = scores.topk(k, dim=1, largest=largest, sorted=False)
    if largest:
        inside = scores >= values.min(1, keepdim=True).values
    else:
        inside = scores <= values.max(1, keepdim=True).values
    if not bool((inside.sum(1) == k).all()):
        return scores, every
    cols = cols.sort(1).values
    return scores.gather(1, cols), cols


class RunningTopK:
    """Most helpful and harmful ``k`` per row of ``(m, c)`` score blocks seen so far; ``O(m k)`` state."""

    def __init__(self, m: int, k: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = k
        empty_v = torch.empty(m, 0, dtype=dtype, device=device)
        empty_i = torch.empty(m, 0, dtype=torch.int64, device=device)
        self.helpful = (empty_v, empty_i)
        self.harmful = (empty_v, empty_i)

    def add(self, scores: Tensor, ids: Tensor) -> None:
        """Merge a block of scores ``(m, c)`` for training ids ``(c,)`` larger than any seen before."""
        check_finite_scores(scores, ids)
        ids = ids.to(scores.device)
        for name, largest in (("helpful", True), ("harmful", False)):
            v, i = getattr(self, name)
            new, cols = preselect(scores, self.k, largest)
            setattr(self, name, merge(torch.cat([v, new], 1), torch.cat([i, ids[cols]], 1), self.k, largest))

    def result(self) -> TopK:
        return TopK(self.helpful[1], self.helpful[0], self.harmful[1], self.harmful[0])


def merge_ranked(parts: list[TopK], k: int) -> TopK:
    """Merge top-k lists over consecutive id ranges (in range order) into one."""
    out = []
    for ids_name, vals_name, largest in (
        ("helpful_ids", "helpful_scores", True),
        ("harmful_ids", "harmful_scores", False),
    ):
        values = torch.cat([getattr(p, vals_name) for p in parts], 1)
        ids = torch.cat([getattr(p, ids_name) for p in parts], 1)
        out.append(merge(values, ids, k, largest))
    (hv, hi), (bv, bi) = out
    return TopK(hi, hv, bi, bv)


def concat_rows(parts: list[TopK]) -> TopK:
    """Stack top-k results of consecutive test blocks."""
    return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in TopK.__dataclass_fields__))
