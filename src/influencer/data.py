"""A user's data in any form (arrays, dicts, Datasets, DataLoaders) as random-access examples."""

from influencer._kernel.data import DatasetExamples, Examples, TensorExamples, as_examples, to_device

__all__ = ["DatasetExamples", "Examples", "TensorExamples", "as_examples", "to_device"]
