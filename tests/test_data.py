"""Data in every accepted form: batching, indices, conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from influencer.data import DatasetExamples, TensorExamples, as_examples, to_device
from influencer.errors import DataError


class Squares(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), float(i * i)]), i % 2


def test_tensor_pairs_are_indexed_in_a_vectorised_way():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    ex = as_examples((x, y))
    assert isinstance(ex, TensorExamples) and len(ex) == 10
    bx, by = ex.take(torch.tensor([3, 1]))
    assert bx.tolist() == [[6.0, 7.0], [2.0, 3.0]] and by.tolist() == [3, 1]


def test_numpy_floats_become_the_default_dtype_and_ints_stay_ints():
    ex = as_examples((np.zeros((4, 3)), np.arange(4)))
    x, y = ex.take(torch.arange(2))
    assert x.dtype == torch.get_default_dtype() and y.dtype == torch.int64


def test_dicts_and_single_arrays_are_batches_of_the_same_structure():
    ex = as_examples({"a": torch.zeros(5, 2), "b": torch.ones(5)})
    assert set(ex.take(torch.arange(3))) == {"a", "b"}
    assert as_examples(torch.zeros(6, 4)).take(torch.arange(2)).shape == (2, 4)


def test_chunks_cover_the_indices_in_order():
    ex = as_examples((torch.arange(10.0),))
    got = [(ids.tolist(), b[0].tolist()) for ids, b in ex.chunks(4, [9, 0, 5, 6, 7])]
    assert got == [([9, 0, 5, 6], [9.0, 0.0, 5.0, 6.0]), ([7], [7.0])]


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_datasets_and_loaders_keep_a_fixed_order(workers):
    loader = DataLoader(Squares(), batch_size=3, shuffle=True, num_workers=workers)
    ex = as_examples(loader)
    assert isinstance(ex, DatasetExamples)
    chunks = list(ex.chunks(4))
    assert [ids.tolist() for ids, _ in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunks[2][1][0].tolist() == [[8.0, 64.0], [9.0, 81.0]]
    assert chunks[2][1][1].tolist() == [0, 1]


def test_tensor_datasets_use_the_fast_path():
    assert isinstance(as_examples(TensorDataset(torch.zeros(3, 2))), TensorExamples)


def test_out_of_range_indices_are_refused():
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        as_examples(Squares()).check_indices([0, 10])


def test_object_arrays_are_refused():
    with pytest.raises(DataError, match="numeric"):
        as_examples((np.array([[1, 2], [3]], dtype=object),))


def test_iterable_datasets_without_length_are_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(DataError, match="map-style"):
        as_examples(Stream())


def test_to_device_casts_floats_only():
    x, y = to_device((torch.zeros(2), torch.zeros(2, dtype=torch.int64)), "cpu", torch.float64)
    assert x.dtype == torch.float64 and y.dtype == torch.int64
