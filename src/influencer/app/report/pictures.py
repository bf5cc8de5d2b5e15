"""Pictures of image inputs for the report, and the small table of a row of features.

Pictures are PNGs encoded here (zlib, no imaging library) and embedded as ``data:`` URIs, so a
report is one self-contained file. Every string that comes from the user's job is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from torch import Tensor


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode ``(H, W)`` grey or ``(H, W, 3)`` RGB ``uint8`` pixels as a PNG file."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        color_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        color_type = 2
    else:
        raise ValueError(f"png_bytes needs (H, W) or (H, W, 3) pixels, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_layout(shape: Sequence[int]) -> str | None:
    """``"gray"`` / ``"rgb"`` if a per-example shape is a picture (``(H, W)``, ``(1|3, H, W)``)."""
    shape = tuple(shape)
    if len(shape) == 2 and min(shape) >= 4:
        return "gray"
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4:
        return "gray" if shape[0] == 1 else "rgb"
    return None


class ExampleView:
    """Renders an example's inputs as HTML: a picture for image data, a small table otherwise.

    ``sample`` ``(k, ...)`` sets the grey/colour range shared by all pictures, so they compare.
    """

    def __init__(
        self,
        sample: Tensor,
        feature_names: Sequence[str] | None = None,
        invert: bool = False,
        max_features: int = 8,
    ) -> None:
        x = sample.detach().cpu().double()
        self.layout = image_layout(x.shape[1:])
        self.invert = invert
        self.lo, self.hi = float(x.min()), float(x.max())
        if not self.hi > self.lo:
            self.hi = self.lo + 1.0
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.max_features = max_features

    def html(self, x: Tensor, alt: str) -> str:
        """One example's inputs ``(...)`` (no batch dimension)."""
        x = x.detach().cpu().double()
        if self.layout is None:
            return self._table(x.reshape(-1).numpy())
        a = ((x.numpy() - self.lo) / (self.hi - self.lo)).clip(0.0, 1.0)
        if self.invert:
            a = 1.0 - a
        if a.ndim == 3:
            a = a[0] if self.layout == "gray" else a.transpose(1, 2, 0)
        pixels = np.round(a * 255).astype(np.uint8)
        return f'<img src="{data_uri(png_bytes(pixels))}" alt="{html.escape(alt)}">'

    def _table(self, values: np.ndarray) -> str:
        return feature_table(values, self.feature_names, self.max_features)


def feature_table(
    values: np.ndarray,
    names: Sequence[str] | None = None,
    max_rows: int = 8,
    order: np.ndarray | None = None,
    shares: np.ndarray | None = None,
) -> str:
    """One example's features ``(d,)`` as a compact table of name and value, in ``order`` (default:
    as given), with each feature's signed share of a score ``(d,)`` when ``shares`` is given;
    features past ``max_rows`` are counted in a last row, listed in its tooltip."""
    names = list(names or [])
    order = np.arange(len(values)) if order is None else order

    def name(i: int) -> str:
        return names[i] if i < len(names) else f"x[{i}]"

    def share(i: int) -> str:
        if shares is None:
            return ""
        cls = "pos" if shares[i] > 0 else "neg" if shares[i] < 0 else ""
        return f'<td class="{cls}">{shares[i]:+.2g}</td>'

    rows = "".join(
        f'<tr><td title="{html.escape(name(i))}">{html.escape(name(i))}</td><td>{values[i]:.3g}</td>'
        f"{share(i)}</tr>"
        for i in order[:max_rows]
    )
    more = ""
    if len(values) > max_rows:
        rest = "; ".join(f"{name(i)} = {values[i]:.3g}" for i in order[max_rows:])
        span = 2 if shares is None else 3
        more = (
            f'<tr><td colspan="{span}" title="{html.escape(rest)}">&hellip; {len(values) - max_rows} more '
            f"of {len(values)} values</td></tr>"
        )
    return f'<table class="feat">{rows}{more}</table>'
