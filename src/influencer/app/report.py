"""A self-contained HTML report of an explanation: one file, no network, no external assets.

Each explained test example is shown with its label and prediction beside its most helpful and most
harmful training examples (pictures for image data, a feature table otherwise), followed by the
influence-vs-distance plot. Pictures are PNGs encoded here (zlib, no imaging library) and embedded
as ``data:`` URIs. Every string that comes from the user's job (names, labels, settings) is HTML-
escaped, and a Content-Security-Policy allows only the report's own inline script (by hash), so
even a mistake in escaping could not run injected code.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from influencer.paper.plotting import pyplot

# Marks the document once every <img> has decoded: a headless browser can check the report
# rendered (data-images-ok / data-images-broken on <body>).
_CHECK_SCRIPT = (
    "(function(){function check(){var imgs=document.images,ok=0,bad=0;"
    "for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}else{bad++;}}"
    "document.body.setAttribute('data-images-ok',String(ok));"
    "document.body.setAttribute('data-images-broken',String(bad));}"
    "if(document.readyState==='complete'){check();}else{window.addEventListener('load',check);}})();"
)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;
 background:#fafbfc}
h1{font-size:1.5em;margin:0 0 4px} h2{font-size:1.15em;margin:28px 0 8px}
.lead{color:#4a5262;max-width:60em} table.facts{border-collapse:collapse;margin:12px 0}
table.facts td{padding:2px 12px 2px 0;vertical-align:top} table.facts td:first-child{color:#6b7385}
.panel{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px;margin:14px 0;
 display:flex;gap:18px}
.query{min-width:150px;border-right:1px solid #e6e9ef;padding-right:16px}
.query .visual img{width:112px;height:auto}
.rows{display:flex;flex-direction:column;gap:10px}
.row{display:flex;gap:10px;align-items:flex-start} .row h3{font-size:.9em;width:88px;margin:6px 0;flex:none}
.helpful h3{color:#1a7f37} .harmful h3{color:#b42318}
figure{margin:0;text-align:center;font-size:.78em;color:#4a5262;width:92px}
figure .visual img{width:72px;height:auto}
img{image-rendering:pixelated;border:1px solid #cfd5df;background:#fff}
.pos{color:#1a7f37;font-weight:600} .neg{color:#b42318;font-weight:600}
.ok{color:#1a7f37;font-weight:600} .wrong{color:#b42318;font-weight:600}
table.feat{border-collapse:collapse;font-size:.85em;margin:2px auto}
table.feat td{padding:0 4px;text-align:right}
table.feat td:first-child{color:#6b7385;text-align:left}
.plot img{max-width:100%;image-rendering:auto;border:none}
.note{color:#6b7385;font-size:.85em;max-width:60em}
"""


# ---- pictures -----------------------------------------------------------------------------------


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
        names = self.feature_names or []
        cells = [
            (html.escape(names[i] if i < len(names) else f"x[{i}]"), f"{values[i]:.3g}")
            for i in range(min(len(values), self.max_features))
        ]
        rows = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in cells)
        more = (
            f'<tr><td colspan="2">&hellip; {len(values)} values</td></tr>'
            if len(values) > self.max_features
            else ""
        )
        return f'<table class="feat">{rows}{more}</table>'


# ---- the influence-vs-distance plot --------------------------------------------------------------


def influence_distance_png(
    distances: np.ndarray,
    scores: np.ndarray,
    titles: Sequence[str],
    same_label: np.ndarray | None = None,
) -> bytes:
    """One panel per test example: score ``(m, n)`` against input distance ``(m, n)`` to each
    training example, coloured by whether its label matches the test label (Koh & Liang, Fig. 1)."""
    plt = pyplot()

    m = len(scores)
    cols = min(m, 4)
    rows = -(-m // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), dpi=100, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= m:
            ax.axis("off")
            continue
        if same_label is None:
            ax.scatter(distances[j], scores[j], s=5, alpha=0.6, color="#3b6fb6", linewidths=0)
        else:
            for mask, color, label in (
                (~same_label[j], "#e07b39", "other label"),
                (same_label[j], "#3b6fb6", "same label"),
            ):
                ax.scatter(
                    distances[j][mask],
                    scores[j][mask],
                    s=5,
                    alpha=0.6,
                    color=color,
                    linewidths=0,
                    label=label,
                )
        ax.axhline(0.0, color="#888", lw=0.7)
        ax.set_title(titles[j], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if j % cols == 0:
            ax.set_ylabel("score (+ helpful)", fontsize=8)
        if j // cols == rows - 1:
            ax.set_xlabel("input distance to test example", fontsize=8)
    if same_label is not None:
        axes.flat[0].legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---- the document --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Card:
    """One example in the report: its rendered inputs (trusted HTML from :class:`ExampleView`)
    and caption lines (plain text, escaped when rendered)."""

    visual: str
    lines: tuple[str, ...]
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class Panel:
    """A test example and its most helpful and harmful training examples."""

    test: Card
    correct: bool | None
    helpful: tuple[Card, ...]
    harmful: tuple[Card, ...]


def _card(card: Card, tag: str = "figure", extra: str = "") -> str:
    lines = "".join(f"<div>{html.escape(line)}</div>" for line in card.lines)
    score = ""
    if card.score is not None:
        cls = "pos" if card.score > 0 else "neg" if card.score < 0 else ""
        score = f'<div class="{cls}">{card.score:+.3g}</div>'
    inner = f'<div class="visual">{card.visual}</div>{lines}{score}{extra}'
    return f"<figure>{inner}</figure>" if tag == "figure" else f'<div class="query">{inner}</div>'


def render_report(
    title: str,
    lead: str,
    facts: Sequence[tuple[str, str]],
    panels: Sequence[Panel],
    plot_png: bytes | None,
    notes: Sequence[str] = (),
) -> str:
    """The whole report as one HTML string. All text arguments are plain text (escaped here)."""
    esc = html.escape
    script_hash = base64.b64encode(hashlib.sha256(_CHECK_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    fact_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts)
    body = []
    for panel in panels:
        verdict = ""
        if panel.correct is not None:
            verdict = '<div class="ok">correct</div>' if panel.correct else '<div class="wrong">wrong</div>'
        query = _card(panel.test, "query", verdict)
        rows = "".join(
            f'<div class="row {kind}"><h3>{label}</h3>{"".join(_card(c) for c in cards)}</div>'
            for kind, label, cards in (
                ("helpful", "Most helpful", panel.helpful),
                ("harmful", "Most harmful", panel.harmful),
            )
        )
        body.append(f'<section class="panel">{query}<div class="rows">{rows}</div></section>')
    plot = ""
    if plot_png is not None:
        plot = (
            '<h2>Influence vs. distance</h2><p class="note">Each dot is a training example: its score on '
            "the test example against the Euclidean distance between their inputs. Same-label examples "
            "far away can still matter; nearby examples of another label are often harmful.</p>"
            f'<div class="plot"><img src="{data_uri(plot_png)}" alt="influence vs distance"></div>'
        )
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="lead">{esc(lead)}</p>'
        f'<table class="facts">{fact_rows}</table>'
        '<p class="note">A score is the predicted change of the test loss if that training example were '
        'removed and the model retrained: <span class="pos">positive = helpful</span> (without it the '
        'test loss would rise), <span class="neg">negative = harmful</span>.</p>'
        f"<h2>Test examples</h2>{''.join(body)}{plot}{note_html}"
        f"<script>{_CHECK_SCRIPT}</script></body></html>\n"
    )
