"""How the report shows an example: a picture, a text, a table row, or its shape and first values.

A :class:`Display` turns a batch of examples into one HTML fragment per example. The fragments
are trusted HTML: every string that comes from the data (decoded text, tokens, feature names) is
escaped here. A job chooses its display with ``Job(display=...)``; otherwise
:func:`choose_display` picks one from the data:

* a dict batch with ``input_ids`` -> :class:`TextDisplay`, decoded with the job's ``tokenizer``
  (token ids without one); texts given as strings (``Job(shown=(train_texts, test_texts))``) too;
* image-shaped inputs ``(H, W)``, ``(1|3, H, W)`` -> :class:`ImageDisplay`;
* rows of features ``(d,)`` -> :class:`TableDisplay` with the job's ``feature_names``;
* anything else -> :class:`GenericDisplay` (shape and the first few values).

``Job(display=fn)`` with a function ``fn(batch) -> list[str]`` shows the strings it returns as
texts (e.g. ``lambda b: tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)``).
"""

from __future__ import annotations

import html
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from influencer.app.report.pictures import ExampleView, feature_table, image_layout
from influencer.errors import ConfigError

Batch = Any  # a batch of the job's data (tuple, dict or tensor), or a list of strings

__all__ = [
    "Display",
    "GenericDisplay",
    "ImageDisplay",
    "TableDisplay",
    "TextDisplay",
    "as_display",
    "choose_display",
    "inputs_of",
]


def inputs_of(batch: Batch) -> Tensor | None:
    """The input tensor ``(B, ...)`` of a batch: ``batch[0]``, an ``input``-like key, or the batch."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in ("image", "images", "input", "inputs", "x", "features", "pixel_values"):
            if isinstance(batch.get(k), Tensor):
                return batch[k]
        floats = [v for v in batch.values() if isinstance(v, Tensor) and v.is_floating_point()]
        return floats[0] if floats else None
    return None


class Display(ABC):
    """Shows examples in the report. Subclasses implement :meth:`html`."""

    kind: ClassVar[str] = "display"

    def prepare(self, sample: Batch) -> None:  # noqa: B027 (optional hook: most displays need none)
        """Called once, before any :meth:`html`, with up to 512 training examples (e.g. to give
        every picture the same grey range). Default: nothing."""

    @abstractmethod
    def html(self, batch: Batch) -> list[str]:
        """One HTML fragment per example of ``batch`` (strings from the data escaped)."""

    def points(self, batch: Batch) -> Tensor | None:
        """The examples as points ``(B, d)`` for the influence-vs-distance figure, or None when
        Euclidean distance between them means nothing (texts). Default: None."""
        return None


def _flat_inputs(batch: Batch, key: str | int | None) -> Tensor | None:
    x = _entry(batch, key) if key is not None else inputs_of(batch)
    if not isinstance(x, Tensor) or x.ndim < 1:
        return None
    return x.reshape(len(x), -1).double().cpu()


def _entry(batch: Batch, key: str | int) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise ConfigError(
            f"the display reads batch[{key!r}], which this data does not have: pass the key of the "
            "entry to show (e.g. TextDisplay(key='input_ids'))"
        ) from exc


class ImageDisplay(Display):
    """Pictures of ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` inputs, all in one grey/colour range
    (that of the training sample), dark-on-light when ``invert``."""

    kind = "images"

    def __init__(self, invert: bool = False, key: str | int | None = None) -> None:
        self.invert = invert
        self.key = key
        self.view: ExampleView | None = None

    def _inputs(self, batch: Batch) -> Tensor:
        x = _entry(batch, self.key) if self.key is not None else inputs_of(batch)
        if not isinstance(x, Tensor) or image_layout(x.shape[1:]) is None:
            shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(
                f"ImageDisplay needs inputs of shape (H, W), (1, H, W) or (3, H, W) per example, got {shape}"
            )
        return x

    def prepare(self, sample: Batch) -> None:
        self.view = ExampleView(self._inputs(sample), invert=self.invert)

    def html(self, batch: Batch) -> list[str]:
        x = self._inputs(batch)
        view = self.view or ExampleView(x, invert=self.invert)
        return [view.html(x[i], f"example {i}") for i in range(len(x))]

    def points(self, batch: Batch) -> Tensor | None:
        return _flat_inputs(batch, self.key)


class TextDisplay(Display):
    """Texts: token ids decoded by a tokenizer or a function, padding removed, long texts trimmed
    with an ellipsis (the whole text in a tooltip and, with the tokens, in an expandable element).

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=True)`` (a Hugging Face
            tokenizer); its ``convert_ids_to_tokens`` (if any) lists the tokens and its
            ``pad_token_id`` marks padding when the batch has no attention mask.
        decode: ``decode(ids: list[int]) -> str`` instead of a tokenizer.
        texts: ``texts(batch) -> list[str]``, for data that is not token ids.
        key: the batch entry holding the token ids ``(B, T)``.
        mask_key: the entry holding the attention mask ``(B, T)`` (1 = token, 0 = padding).
        pad_id: the padding token's id, removed when the batch has no attention mask (default:
            the tokenizer's ``pad_token_id``).
        max_chars: characters shown before the ellipsis.
        max_tokens: tokens listed in the expandable element (the rest are counted).
    """

    kind = "text"

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        decode: Callable[[list[int]], str] | None = None,
        texts: Callable[[Batch], Sequence[str]] | None = None,
        key: str | int = "input_ids",
        mask_key: str = "attention_mask",
        pad_id: int | None = None,
        max_chars: int = 120,
        max_tokens: int = 256,
    ) -> None:
        if sum(x is not None for x in (tokenizer, decode, texts)) > 1:
            raise ConfigError("TextDisplay takes one of tokenizer, decode or texts")
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ConfigError(
                f"TextDisplay's tokenizer needs a decode(ids) method; {type(tokenizer).__name__} has none"
            )
        if max_chars < 8:
            raise ConfigError(f"TextDisplay.max_chars must be >= 8, got {max_chars}")
        if max_tokens < 1:
            raise ConfigError(f"TextDisplay.max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer, self.decode, self.texts = tokenizer, decode, texts
        self.key, self.mask_key, self.max_chars, self.max_tokens = key, mask_key, max_chars, max_tokens
        self.pad_id = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)

    def token_ids(self, batch: Batch) -> list[list[int]]:
        """Each example's token ids without padding."""
        ids = _entry(batch, self.key)
        if not isinstance(ids, Tensor) or ids.ndim != 2:
            raise ConfigError(
                f"TextDisplay needs token ids (B, T) in batch[{self.key!r}], got "
                + (f"shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__)
            )
        mask = batch.get(self.mask_key) if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.shape == ids.shape:
            keep = mask.bool()
        else:
            pad = self.pad_id
            keep = ids != pad if isinstance(pad, int) else torch.ones_like(ids, dtype=torch.bool)
        return [row[k].tolist() for row, k in zip(ids.cpu(), keep.cpu(), strict=True)]

    def _decoded(self, batch: Batch) -> list[tuple[str, list[str] | None]]:
        if isinstance(batch, (list, tuple)) and all(isinstance(s, str) for s in batch):
            return [(s, None) for s in batch]
        if self.texts is not None:
            return [(str(s), None) for s in self.texts(batch)]
        out = []
        for ids in self.token_ids(batch):
            if self.decode is not None:
                out.append((str(self.decode(ids)), None))
            elif self.tokenizer is not None:
                text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
                convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
                out.append((text, [str(t) for t in convert(ids)] if callable(convert) else None))
            else:
                out.append(("token ids: " + " ".join(map(str, ids)), None))
        return out

    def html(self, batch: Batch) -> list[str]:
        return [self._fragment(text, tokens) for text, tokens in self._decoded(batch)]

    def _fragment(self, text: str, tokens: list[str] | None) -> str:
        esc = html.escape
        text = " ".join(text.split())  # one line: newlines and runs of spaces as single spaces
        trimmed = len(text) > self.max_chars
        shown = text[: self.max_chars - 1].rstrip() + "\u2026" if trimmed else text
        out = f'<div class="text" title="{esc(text)}">{esc(shown)}</div>'
        details = []
        if trimmed:
            details.append(f'<div class="full">{esc(text)}</div>')
        if tokens is not None:
            details.append("".join(f'<span class="tok">{esc(t)}</span>' for t in tokens[: self.max_tokens]))
            if len(tokens) > self.max_tokens:
                details.append(f" \u2026 {len(tokens) - self.max_tokens} more")
        if details:
            what = f"{len(tokens)} tokens" if tokens is not None else f"full text ({len(text)} characters)"
            out += f'<details class="more"><summary>{what}</summary>{"".join(details)}</details>'
        return out


class TableDisplay(Display):
    """Rows of features as a compact table of name and value, most important features first.

    Args:
        feature_names: one name per feature (default ``x[0]``, ``x[1]``, ...).
        importance: one number per feature (e.g. a linear model's weight norms, permutation
            importances); features are shown by decreasing ``|importance|``. Default: as given.
        max_features: rows shown; the rest are listed in the last row's tooltip.
        key: the batch entry holding the rows ``(B, d)`` (default: the inputs).
    """

    kind = "table"

    def __init__(
        self,
        feature_names: Sequence[str] | None = None,
        *,
        importance: Sequence[float] | Tensor | np.ndarray | None = None,
        max_features: int = 8,
        key: str | int | None = None,
    ) -> None:
        if max_features < 1:
            raise ConfigError(f"TableDisplay.max_features must be >= 1, got {max_features}")
        self.feature_names = [str(n) for n in feature_names] if feature_names is not None else None
        self.importance = None if importance is None else np.abs(np.asarray(importance, dtype=np.float64))
        if self.importance is not None and self.importance.ndim != 1:
            raise ConfigError("TableDisplay.importance must have one number per feature")
        if (
            self.importance is not None
            and self.feature_names is not None
            and len(self.importance) != len(self.feature_names)
        ):
            raise ConfigError(
                f"TableDisplay got {len(self.importance)} importances for "
                f"{len(self.feature_names)} feature names"
            )
        self.max_features = max_features
        self.key = key

    def _rows(self, batch: Batch) -> np.ndarray:
        x = _flat_inputs(batch, self.key)
        if x is None:
            raise ConfigError("TableDisplay needs the rows of features (B, d) in the batch")
        d = x.shape[1]
        for what, size in (("feature names", self.feature_names), ("importances", self.importance)):
            if size is not None and len(size) != d:
                raise ConfigError(f"TableDisplay has {len(size)} {what} for rows of {d} features")
        return x.numpy()

    def order(self, d: int) -> np.ndarray:
        """Feature indices in the order shown."""
        if self.importance is None:
            return np.arange(d)
        return np.argsort(-self.importance, kind="stable")

    def html(self, batch: Batch, shares: Tensor | np.ndarray | None = None) -> list[str]:
        """As :meth:`Display.html`; with ``shares`` ``(B, d)`` (each feature's signed share of the
        example's score, e.g. gradient x input) each row lists its features by decreasing
        ``|share|`` beside their shares."""
        rows = self._rows(batch)
        if shares is None:
            order = self.order(rows.shape[1]) if len(rows) else np.arange(0)
            return [feature_table(row, self.feature_names, self.max_features, order) for row in rows]
        w = np.asarray(torch.as_tensor(shares).detach().cpu().double()).reshape(rows.shape)
        return [
            feature_table(
                row, self.feature_names, self.max_features, np.argsort(-np.abs(s), kind="stable"), s
            )
            for row, s in zip(rows, w, strict=True)
        ]

    def points(self, batch: Batch) -> Tensor | None:
        return _flat_inputs(batch, self.key)


class GenericDisplay(Display):
    """Any example: the dtype and shape of each of its tensors and their first few values."""

    kind = "generic"

    def __init__(self, max_values: int = 6) -> None:
        self.max_values = max_values

    def html(self, batch: Batch) -> list[str]:
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(s, str) for s in batch):
            return TextDisplay().html(batch)
        if isinstance(batch, Mapping):
            leaves = [(str(k), v) for k, v in batch.items() if isinstance(v, Tensor)]
        else:
            flat = tree_flatten(batch)[0]
            leaves = [
                (f"[{i}]" if len(flat) > 1 else "", v) for i, v in enumerate(flat) if isinstance(v, Tensor)
            ]
        n = len(leaves[0][1]) if leaves else 0
        return ["".join(self._leaf(name, v[i]) for name, v in leaves) for i in range(n)]

    def _leaf(self, name: str, value: Tensor) -> str:
        flat = value.detach().cpu().reshape(-1)
        shown = flat[: self.max_values].tolist()
        text = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in shown)
        more = ", \u2026" if flat.numel() > self.max_values else ""
        kind = str(value.dtype).removeprefix("torch.")
        label = f"{name} " if name else ""
        shape = f"{html.escape(label)}{kind} {tuple(value.shape)}"
        return f'<div class="generic"><span class="shape">{shape}</span> {html.escape(text)}{more}</div>'

    def points(self, batch: Batch) -> Tensor | None:
        x = inputs_of(batch)
        return (
            x.reshape(len(x), -1).double().cpu() if isinstance(x, Tensor) and x.is_floating_point() else None
        )


def as_display(value: Any) -> Display | None:
    """A job's ``display`` setting as a :class:`Display`: a Display, or a function ``batch ->
    list[str]`` of texts (None stays None: the display is chosen from the data)."""
    if value is None or isinstance(value, Display):
        return value
    if callable(value):
        return TextDisplay(texts=value)
    raise ConfigError(
        "a job's display must be an influencer.app.report.display.Display (ImageDisplay, TextDisplay, "
        f"TableDisplay, GenericDisplay) or a function batch -> list of strings; got {type(value).__name__}"
    )


def choose_display(
    sample: Batch,
    *,
    tokenizer: Any = None,
    feature_names: Sequence[str] | None = None,
    invert_images: bool = False,
) -> Display:
    """The display a person would expect for data like ``sample`` (see the module docstring)."""
    if isinstance(sample, (list, tuple)) and sample and all(isinstance(s, str) for s in sample):
        return TextDisplay()
    if isinstance(sample, Mapping) and isinstance(sample.get("input_ids"), Tensor):
        return TextDisplay(tokenizer)
    x = inputs_of(sample)
    if isinstance(x, Tensor) and image_layout(x.shape[1:]) is not None:
        return ImageDisplay(invert=invert_images)
    if isinstance(x, Tensor) and x.ndim == 2:
        return TableDisplay(feature_names)
    return GenericDisplay()
