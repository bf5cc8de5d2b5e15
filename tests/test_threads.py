"""Helper threads run torch single-threaded and leave the caller's setting alone."""

from __future__ import annotations

import threading

import torch

from influencer import ClassificationTask, Influence
from influencer._kernel.threads import background_pool
from influencer.estimators import Identity
from influencer.index import (
    GradientIndex,
    IdentityProjector,
    KroneckerProjector,
    TrainingStore,
    TrainingStoreSettings,
)
from influencer.models import MLP


def _fresh_thread_threads() -> int:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_background_pool_runs_one_thread_and_restores_the_caller() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with background_pool("test") as pool:
            # the worker's torch operations use one thread, also after a parallel operation
            assert pool.submit(lambda: (torch.randn(512, 512) @ torch.randn(512, 512)).sum()).result() != 0
            assert pool.submit(torch.get_num_threads).result() == 1
            # the caller and threads started afterwards keep the caller's number
            assert torch.get_num_threads() == 2
            assert _fresh_thread_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_training_store_writer_and_the_index_reader_run_one_thread(tmp_path, monkeypatch) -> None:
    """The library's two helper threads that run torch operations: the training store's file
    writer and the query's chunk reader (the caller at 2 threads, so 1 is not the default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model, task = MLP(6, (8,), 3), ClassificationTask()
        data = (torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen))
        settings = TrainingStoreSettings(
            checkpoints=(0,), projector=KroneckerProjector(k_in=2, k_out=2, basis="random")
        )
        store = TrainingStore(model, task, data, tmp_path / "train", settings)
        for ids in torch.arange(64).split(16):
            with store.step(ids, lr=0.1):
                task.loss(model, (data[0][ids], data[1][ids])).mean().backward()
        assert store._writer is not None
        assert store._writer.submit(torch.get_num_threads).result() == 1
        store.finish()

        seen: list[tuple[str, int]] = []
        read = GradientIndex._rows

        def rows(self, j):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return read(self, j)

        monkeypatch.setattr(GradientIndex, "_rows", rows)
        inf = Influence(model, task, data, estimator=Identity())
        index = GradientIndex.build(inf, tmp_path / "post", IdentityProjector(), chunk=16)
        index.top_k((data[0][:3], data[1][:3]), k=2)
        assert len(seen) == 4 and all(name.startswith("index-read") and n == 1 for name, n in seen)
        assert torch.get_num_threads() == 2 and _fresh_thread_threads() == 2
    finally:
        torch.set_num_threads(before)
