"""Tasks for Hugging Face ``transformers`` models: sequence classification and causal language models.

Batches are dicts of tensors, as a tokenizer returns them with padding::

    {"input_ids": (B, T) int, "attention_mask": (B, T) 1 = token / 0 = padding, "labels": ...}

(``token_type_ids``, ``position_ids`` or any other model keyword may be there too). Every entry but
the labels is passed to ``model(**inputs)``. transformers is imported only by the models themselves;
the vectorised path is tested with transformers 5, whose models take a ready 4-D mask.

Per-example gradients run the model on one example at a time under ``torch.func.vmap``, where
Python control flow may not depend on tensor values. transformers builds its attention masks with
such checks (``padding_mask.all()``), so the tasks pass a ready 4-D additive mask ``(B, 1, T, T)``
(0 where a query may attend to a key, the dtype's minimum elsewhere; causal for decoders), which
every attention implementation takes as it is. Attention runs in PyTorch's math kernel, the one
that supports both ``vmap`` and forward-mode AD (Hessian-vector products). Models that still cannot
run under vmap, or refuse a 4-D mask (some models of transformers 4), raise a
:class:`~influencer.errors.TaskError` naming the fallback, ``vectorize=False``: the same gradients,
one example at a time, with the model's own mask handling.

LoRA and other ``peft`` adapters: :func:`adapter_parameters` lists the adapter weights, to pass as
``Influence(..., params=adapter_parameters(model))``; frozen base weights stay fixed.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from influencer._kernel.errors import TaskError
from influencer._kernel.losses import cross_entropy, cross_entropy_fisher
from influencer._kernel.task import Batch, DecayedTask, batch_entry

IGNORE_INDEX = -100  # transformers' label for "not scored"
REDUCTIONS = ("sum", "mean")

# model -> (decoder?, accepts use_cache?), looked up once per model instead of on every forward
_MODEL_FACTS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def _model_facts(model: nn.Module) -> tuple[bool, bool]:
    facts = _MODEL_FACTS.get(model)
    if facts is None:
        # transformers marks decoder self-attention modules with is_causal = True.
        causal = any(getattr(m, "is_causal", False) is True for m in model.modules())
        try:
            takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        facts = (causal, takes_cache)
        _MODEL_FACTS[model] = facts
    return facts


def additive_attention_mask(attention_mask: Tensor, dtype: torch.dtype, causal: bool) -> Tensor:
    """``(B, T)`` padding mask (1 = token) -> ``(B, 1, T, T)`` additive mask in ``dtype``.

    Entry ``[b, 0, i, j]`` is 0 when query ``i`` may attend to key ``j`` (``j`` is a token, and
    ``j <= i`` if ``causal``), else ``finfo(dtype).min``: finite, so a query with no key to attend
    to (a padded position) gets uniform weights instead of NaN.
    """
    b, t = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    keep = keep.expand(b, 1, t, t)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


class HuggingFaceTask(DecayedTask):
    """Shared batch handling of :class:`SequenceClassificationTask` and :class:`CausalLMTask`.

    Args:
        weight_decay: ``c`` of the L2 penalty ``c/2 ||theta||^2`` the model was trained with.
        label_key: the batch entry holding the labels (not passed to the model).
        input_keys: the entries passed to ``model(**inputs)``; default every entry but the labels.
        causal: whether attention is causal (decoders such as GPT-2); default: detected from the
            model's attention modules (transformers sets ``is_causal`` on them).
        expand_mask: pass the 4-D additive mask built from ``attention_mask`` (see the module
            docstring); False passes the batch's mask as it is. Default: when ``vectorize``.
        vectorize: per-example gradients under ``vmap`` (fast); False: one example at a time with
            the model's own mask handling, for models whose forward cannot run under vmap.
    """

    variable_length = True

    def __init__(
        self,
        *,
        weight_decay: float = 0.0,
        label_key: str = "labels",
        input_keys: Sequence[str] | None = None,
        causal: bool | None = None,
        expand_mask: bool | None = None,
        vectorize: bool = True,
    ) -> None:
        super().__init__(weight_decay, label_key=label_key)
        if isinstance(input_keys, str):
            input_keys = (input_keys,)
        if input_keys is not None and (not input_keys or not all(isinstance(k, str) for k in input_keys)):
            raise TaskError(f"input_keys must be a non-empty sequence of str, got {input_keys!r}")
        self.input_keys = tuple(input_keys) if input_keys is not None else None
        self.causal = causal
        self.vectorize = bool(vectorize)
        self.expand_mask = self.vectorize if expand_mask is None else bool(expand_mask)

    def model_inputs(self, model: nn.Module, batch: Batch) -> dict[str, Any]:
        """The keyword arguments of ``model(**inputs)`` for a dict batch (mask expanded to 4-D)."""
        if not isinstance(batch, Mapping):
            raise TaskError(
                f"{type(self).__name__} needs dict batches such as {{'input_ids': (B, T), "
                f"'attention_mask': (B, T), {self.label_key!r}: ...}}, got a {type(batch).__name__}: "
                "pass the training data as a dict of tensors (what a tokenizer returns)"
            )
        keys = self.input_keys or [k for k in batch if k != self.label_key]
        fix = f"pass {type(self).__name__}(input_keys=[...]) naming the model's inputs"
        inputs = {k: batch_entry(batch, k, f"input {k!r}", self, fix) for k in keys}
        causal_default, takes_cache = _model_facts(model)
        mask = inputs.get("attention_mask")
        if self.expand_mask and isinstance(mask, Tensor) and mask.ndim == 2:
            causal = causal_default if self.causal is None else self.causal
            inputs["attention_mask"] = additive_attention_mask(mask, _float_dtype(model), causal)
        if takes_cache:
            inputs.setdefault("use_cache", False)  # no key/value cache: nothing is generated
        return inputs

    def positions(self, batch: Batch) -> Tensor | None:
        """The padding mask ``(B, T)`` (``attention_mask`` as bool), or None without one."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return mask.bool() if isinstance(mask, Tensor) and mask.ndim == 2 else None

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """``model(**inputs).logits``; a model that cannot run under ``vmap`` raises naming the fix."""
        inputs = self.model_inputs(model, batch)
        try:
            with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with vmap and forward-AD rules
                out = model(**inputs)
        except (RuntimeError, ValueError) as exc:  # NotImplementedError is a RuntimeError too
            clear = self._explain(exc)
            if clear is exc:
                raise
            raise clear from exc
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, Tensor):
            raise TaskError(
                f"{type(self).__name__} needs a model whose output has .logits (a transformers "
                f"...ForSequenceClassification or ...ForCausalLM model), got {type(out).__name__}"
            )
        return logits

    def _explain(self, exc: Exception) -> Exception:
        message = str(exc)
        first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        first = first if len(first) <= 100 else first[:100] + "..."
        name = type(self).__name__
        fallback = (
            f"Pass {name}(vectorize=False) to compute per-example gradients one example at a time with "
            "the model's own mask handling (same results, slower)"
        )
        if "vmap" in message:
            also = "" if self.expand_mask else "; or leave expand_mask=True, so transformers builds no mask"
            return TaskError(
                f"the model's forward cannot run under torch.func.vmap, it branches on tensor values "
                f"({first!r}). {fallback}{also}"
            )
        if isinstance(exc, ValueError) and self.expand_mask and "mask" in message:
            return TaskError(
                f"the model does not take a ready 4-D attention mask ({first!r}); transformers >= 5 "
                f"passes one through in its models. {fallback}"
            )
        if "forward AD" in message:
            return TaskError(
                f"the model's forward does not support forward-mode AD, needed for Hessian-vector "
                f"products ({first}). Load the model with attn_implementation='eager', or use "
                "curvature='gauss_newton' with an estimator that needs no products (KFAC, EKFAC)"
            )
        return exc

    def settings(self) -> dict[str, Any]:
        return {
            "task": type(self).__qualname__,
            "weight_decay": self.weight_decay,
            "label_key": self.label_key,
            "input_keys": list(self.input_keys) if self.input_keys is not None else None,
            "causal": self.causal,
            "expand_mask": self.expand_mask,
        }


class SequenceClassificationTask(HuggingFaceTask):
    """Cross-entropy of a ``...ForSequenceClassification`` model on dict batches.

    Outputs are ``model(**inputs).logits`` ``(B, C)`` and the loss is the cross-entropy with the
    integer labels ``batch["labels"]`` ``(B,)``, so the Gauss-Newton curvature, K-FAC and EK-FAC
    (exact Fisher) work. See :class:`HuggingFaceTask` for the options.
    """

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.logits(model, batch)

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return cross_entropy(outputs, self.targets(batch))

    def fisher_directions(
        self, outputs: Tensor, batch: Batch, samples: int | None, generator: torch.Generator
    ) -> Tensor:
        """The cross-entropy's directions (see :func:`~influencer._kernel.losses.cross_entropy_fisher`);
        an example labelled ``-100`` is not in the loss and gets none."""
        weight = (self.targets(batch) != IGNORE_INDEX).to(outputs.device, outputs.dtype)
        return cross_entropy_fisher(outputs, weight, samples, generator)


class CausalLMTask(HuggingFaceTask):
    """Next-token cross-entropy of a ``...ForCausalLM`` model, one value per sequence.

    Token ``t`` is predicted from the tokens before it. The targets are ``batch["labels"]`` in
    transformers' convention (a copy of ``input_ids``, with ``-100`` where a token is not scored,
    e.g. the prompt) or ``input_ids`` when the batch has no labels. Padded positions
    (``attention_mask == 0``) are never scored, nor is a token right after padding (the first
    token of a left-padded sequence), so every sequence scores as it would run alone.

    Args:
        reduction: how a sequence's token losses become its loss. ``"sum"`` (default): their sum,
            so a sequence weighs by its number of scored tokens, as it does in a token-averaged
            training loss over equal-length batches; ``"mean"``: their mean (0 for a sequence
            with no scored token). The test measurement is reduced the same way; to measure single
            tokens use :func:`per_token_examples`.
        **options: see :class:`HuggingFaceTask`.

    Outputs are the logits ``(B, T, V)``, so the Gauss-Newton curvature works; K-FAC/EK-FAC take
    the true Fisher from one next token per position sampled from the model (their default for
    models with many outputs, ``fisher="sampled"``); ``fisher="exact"`` would need ``T * V``
    backward passes per chunk.
    """

    def __init__(self, *, reduction: str = "sum", **options: Any) -> None:
        super().__init__(**options)
        if reduction not in REDUCTIONS:
            raise TaskError(f"CausalLMTask.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.logits(model, batch)

    def token_losses(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-token losses ``(B, T-1)`` (0 where not scored) and the scored-token mask ``(B, T-1)``.

        Column ``t`` is the loss of predicting token ``t + 1``.
        """
        targets, scored = scored_targets(batch, self.label_key)
        # Token t + 1 is predicted from position t; with left padding the first token's context is
        # a pad, so it is not scored (as when the sequence runs alone).
        targets, scored = targets[:, 1:], scored[:, 1:] & _context(batch, scored)[:, :-1]
        logits = outputs[:, :-1]
        safe = torch.where(scored, targets, torch.zeros_like(targets))  # any valid class index
        losses = cross_entropy(logits.flatten(0, 1), safe.flatten())
        return torch.where(scored, losses.view(safe.shape), torch.zeros_like(logits[..., 0])), scored

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        if outputs.ndim != 3:
            raise TaskError(
                f"CausalLMTask needs logits of shape (B, T, V), got {tuple(outputs.shape)}: use a "
                "...ForCausalLM model"
            )
        losses, scored = self.token_losses(outputs, batch)
        total = losses.sum(dim=1)
        if self.reduction == "sum":
            return total
        return total / scored.sum(dim=1).clamp_min(1).to(total.dtype)

    def fisher_directions(
        self, outputs: Tensor, batch: Batch, samples: int | None, generator: torch.Generator
    ) -> Tensor | None:
        """Sampled: one next token per scored position drawn from the model (the true Fisher;
        positions are independent given the inputs), ``(B, T * V, samples)``. The exact
        expectation (``V`` directions per position) is left to the generic factor, which refuses
        real vocabularies."""
        if samples is None or outputs.ndim != 3:
            return None
        _, scored = scored_targets(batch, self.label_key)
        scored = scored[:, 1:] & _context(batch, scored)[:, :-1]  # (B, T-1): position t predicts t + 1
        weight = scored.to(outputs.dtype)
        if self.reduction == "mean":
            weight = weight / scored.sum(dim=1, keepdim=True).clamp_min(1).to(weight.dtype)
        weight = F.pad(weight, (0, 1))  # (B, T): the last position predicts nothing
        cols = cross_entropy_fisher(outputs, weight.to(outputs.device), samples, generator)  # (B, T, V, S)
        return cols.reshape(outputs.shape[0], -1, samples)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reduction": self.reduction}


def scored_targets(batch: Mapping[str, Tensor], label_key: str = "labels") -> tuple[Tensor, Tensor]:
    """Next-token targets ``(B, T)`` and which of them are scored ``(B, T)`` bool (see CausalLMTask)."""
    ids = batch.get("input_ids")
    targets = batch.get(label_key, ids)
    if not isinstance(targets, Tensor) or targets.ndim != 2:
        raise TaskError(
            f"CausalLMTask needs {label_key!r} or 'input_ids' of shape (B, T) in the batch; the batch "
            f"has keys {', '.join(repr(k) for k in batch)}"
        )
    scored = targets != IGNORE_INDEX
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == targets.shape:
        scored = scored & mask.bool()
    return targets, scored


def _context(batch: Mapping[str, Tensor], scored: Tensor) -> Tensor:
    """Which positions ``(B, T)`` are real tokens that later tokens can be predicted from."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == scored.shape:
        return mask.bool()
    return torch.ones_like(scored)


def per_token_examples(
    batch: Mapping[str, Tensor],
    index: int = 0,
    positions: Sequence[int] | Tensor | None = None,
    label_key: str = "labels",
) -> dict[str, Tensor]:
    """Test examples measuring single tokens of sequence ``index`` of ``batch`` (for :class:`CausalLMTask`).

    Returns ``k`` copies of the sequence, copy ``j`` scoring only the token at ``positions[j]``
    (its loss given the tokens before it). ``Influence.scores`` on the result gives ``(k, n)``:
    row ``j`` is each training sequence's influence on token ``positions[j]``. ``positions``
    default: every token the task scores.
    """
    targets, scored = scored_targets(batch, label_key)
    if not 0 <= index < targets.shape[0]:
        raise TaskError(f"index {index} is out of range for a batch of {targets.shape[0]} sequences")
    row_scored = scored[index].clone()
    row_scored[1:] &= _context(batch, scored)[index, :-1]
    row_scored[0] = False  # the first token has no context to be predicted from
    if positions is None:
        pos = row_scored.nonzero().flatten()
    else:
        pos = torch.as_tensor(positions, dtype=torch.int64).flatten()
        bad = [int(p) for p in pos if not (0 <= int(p) < len(row_scored) and row_scored[int(p)])]
        if bad:
            raise TaskError(
                f"positions {bad} of sequence {index} are not scored tokens (padding, label -100, out "
                f"of range, or position 0); scored positions: {row_scored.nonzero().flatten().tolist()}"
            )
    if len(pos) == 0:
        raise TaskError(f"sequence {index} has no scored token to measure")
    k = len(pos)
    out = {key: value[index].unsqueeze(0).expand(k, *value.shape[1:]).clone() for key, value in batch.items()}
    labels = torch.full_like(targets[index], IGNORE_INDEX).unsqueeze(0).repeat(k, 1)
    labels[torch.arange(k), pos] = targets[index, pos]
    out[label_key] = labels
    return out


def adapter_parameters(model: nn.Module, *, heads: bool = True, trainable_only: bool = True) -> list[str]:
    """Names of the adapter weights of a ``peft`` model (LoRA's ``lora_A``/``lora_B``, IA3, ...).

    Found from peft's tuner layers (each lists its adapter sub-layers in ``adapter_layer_names``),
    so any peft method works. ``heads``: also the trainable copies of layers peft trains in full
    (``modules_to_save``, e.g. a classifier head). ``trainable_only``: only those that require
    grad (the active adapters). Pass the result as ``Influence(..., params=...)``; every other
    weight, the frozen base model included, stays fixed.
    """
    names: list[str] = []
    for path, module in model.named_modules():
        for attr in getattr(module, "adapter_layer_names", ()):
            sub = getattr(module, attr, None)
            if not isinstance(sub, nn.Module) or (attr == "modules_to_save" and not heads):
                continue
            prefix = f"{path}.{attr}" if path else attr
            for name, p in sub.named_parameters():
                full = f"{prefix}.{name}"
                if (p.requires_grad or not trainable_only) and full not in names:
                    names.append(full)
    if not names:
        raise TaskError(
            "no peft adapter parameters found: wrap the model with peft.get_peft_model(model, config) "
            "first (or pass trainable_only=False if the adapters are frozen)"
        )
    return names


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (of its input embeddings, as the library passes them)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
