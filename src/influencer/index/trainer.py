"""Collect a :class:`~influencer.index.training.TrainingStore` inside a Hugging Face ``Trainer``.

::

    from influencer.index.trainer import IndexedDataset, store_callback

    store = TrainingStore(model, CausalLMTask(), train_batch, "runs/store", TrainingStoreSettings(
        checkpoints=(0, 40), projector=KroneckerProjector(k_in=16, k_out=16, basis="random")))
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=IndexedDataset(dataset), callbacks=[store_callback(store)])
    trainer.train()                    # writes runs/store/step-00000000, runs/store/step-00000040

``IndexedDataset`` adds each example's id (its position in the training data the store was given)
to the example dict under :data:`ID_KEY`; the callback removes it from the model's keyword
arguments before the forward pass (a forward pre-hook) and wraps every optimizer step's forward
and backward pass in :meth:`TrainingStore.step`, with the optimizer's learning rate. Checkpoint
steps are optimizer steps (``state.global_step``, from 0).

The per-example scale is the Trainer's: a causal language model's loss is the summed token
cross-entropy divided by the ``num_items_in_batch`` the Trainer passes the model (else by the
number of predicted tokens, ``labels[:, 1:] != -100``), which the callback multiplies back
(divided by each sequence's count for ``CausalLMTask(reduction="mean")``); any other model's loss
is taken to be the batch mean.
Gradient accumulation is not supported (each micro-batch would be scaled by the whole step's
token count): use ``gradient_accumulation_steps=1``. Mixed precision with ``bf16=True`` is: the
store projects the bfloat16 activations and gradients in its own dtype, and its own passes (the
first batch's check, a PCA basis) run the model's forward without accelerate's autocast.
``fp16=True`` is not supported: its gradients carry the loss scaler's factor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from influencer._kernel.errors import ConfigError
from influencer.index.training import TrainingStore

ID_KEY = "influencer_ids"


class IndexedDataset(Dataset):
    """A map-style dataset of dicts whose items also carry their index under :data:`ID_KEY`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise ConfigError(
                f"IndexedDataset needs dict items (as a Trainer takes them), got {type(item).__name__}"
            )
        return {**item, ID_KEY: i}


def token_scale(task: Any, labels: Tensor, num_items: Any = None) -> Tensor:
    """Per-example factor from the Trainer's causal-LM loss to the task's per-sequence losses ``(B,)``.

    The loss is the summed token cross-entropy divided by ``num_items`` (what the Trainer passes the
    model as ``num_items_in_batch``; its count may include a position the model does not predict),
    or else by the number of predicted tokens.
    """
    counts = (labels[:, 1:] != -100).sum(1).to(torch.float64)  # predicted tokens per sequence
    total = counts.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float64).cpu()
    if getattr(task, "reduction", "sum") == "mean":
        return total / counts.clamp_min(1)
    return total.expand(len(counts))


@contextlib.contextmanager
def _plain_forward(model: Any, skip: bool) -> Iterator[None]:
    """The model's own ``forward`` for the block, where accelerate's mixed precision wrapped it in
    autocast (keeping the original as ``_original_forward``): the store's own passes (the first
    batch's check, a PCA basis) run the model at the store's precision, as a post-hoc store does."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if skip or wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def store_callback(store: TrainingStore) -> Any:
    """A ``transformers.TrainerCallback`` feeding ``store`` from the Trainer's steps (see the module)."""
    from transformers import TrainerCallback

    class _StoreCallback(TrainerCallback):
        def __init__(self) -> None:
            self.lr = 0.0
            self.open = contextlib.ExitStack()
            self.handle: Any = None

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if args.gradient_accumulation_steps != 1:
                raise ConfigError(
                    "the training-time store needs gradient_accumulation_steps=1 (got "
                    f"{args.gradient_accumulation_steps}): with accumulation the Trainer scales each "
                    "micro-batch by the whole step's token count"
                )
            if args.remove_unused_columns:
                raise ConfigError(
                    "the training-time store needs TrainingArguments(remove_unused_columns=False): the "
                    f"Trainer would drop the example ids ({ID_KEY!r}) before the model sees them"
                )
            if model is not store.model:
                raise ConfigError("the Trainer's model is not the model the TrainingStore was given")
            if store.steps != state.global_step:
                store.steps = state.global_step  # resumed training: windows count optimizer steps
            self.handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

        def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ids = kwargs.pop(ID_KEY, None)
            if ids is None or not module.training:
                return args, kwargs
            if not store.collecting:
                store.skip_step()  # nothing recorded in this step
                return args, kwargs
            labels = kwargs.get("labels")
            scale = None
            if labels is not None and labels.ndim == 2 and hasattr(store.task, "token_losses"):
                scale = token_scale(store.task, labels, kwargs.get("num_items_in_batch"))
            # a window opening fits its basis (PCA) with the model's forward: at the store's precision
            with _plain_forward(module, store.steps not in store.settings.checkpoints):
                self.open.enter_context(store.step(ids.cpu(), lr=self.lr, scale=scale))
            return args, kwargs

        def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
            if optimizer is not None:
                self.lr = float(optimizer.param_groups[0]["lr"])

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # the step's backward is done: its rows are kept (the first is checked against the model's
            # forward, at the store's precision)
            with _plain_forward(store.model, store.checked):
                self.open.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.open.close()
            if self.handle is not None:
                self.handle.remove()
            store.finish()

    return _StoreCallback()
