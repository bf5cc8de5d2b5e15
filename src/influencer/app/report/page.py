"""The report as one HTML document: no network, no external assets.

Each explained test example is a :class:`Panel`: its :class:`Card` beside the cards of its most
helpful and most harmful training examples; then the training examples that recur among the most
harmful (candidates to inspect) and the influence-vs-distance figure. Every
string that comes from the user's job (names, labels, settings) is HTML-escaped here, and a
Content-Security-Policy allows only the report's own inline script (by hash), so even a mistake in
escaping could not run injected code.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
from collections.abc import Sequence

from influencer.app.report.pictures import data_uri

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
.query{min-width:150px;max-width:260px;border-right:1px solid #e6e9ef;padding-right:16px}
.query .visual img{width:112px;height:auto}
.rows{display:flex;flex-direction:column;gap:10px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.row h3{font-size:.9em;width:88px;margin:6px 0;flex:none}
.helpful h3{color:#1a7f37} .harmful h3{color:#b42318}
figure{margin:0;text-align:center;font-size:.78em;color:#4a5262;min-width:92px;max-width:260px}
figure .visual img{width:72px;height:auto}
img{image-rendering:pixelated;border:1px solid #cfd5df;background:#fff}
.pos{color:#1a7f37;font-weight:600} .neg{color:#b42318;font-weight:600}
.ok{color:#1a7f37;font-weight:600} .wrong{color:#b42318;font-weight:600}
table.feat{border-collapse:collapse;font-size:.85em;margin:2px auto}
table.feat td{padding:0 4px;text-align:right}
table.feat td:first-child{color:#6b7385;text-align:left;max-width:110px;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap}
.text{font-size:.92em;color:#1d2330;text-align:left;overflow-wrap:anywhere;margin:2px 0}
details.more{text-align:left;font-size:.85em;margin:2px 0} details.more summary{cursor:pointer;color:#6b7385}
.full{margin:4px 0;overflow-wrap:anywhere}
.tok{display:inline-block;border:1px solid #dde1e8;border-radius:3px;padding:0 3px;margin:1px;
 font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;background:#f4f6f9}
.generic{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;text-align:left;
 overflow-wrap:anywhere} .generic .shape{color:#6b7385}
.plot img{max-width:100%;image-rendering:auto;border:none}
.note{color:#6b7385;font-size:.85em;max-width:60em}
"""


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
    candidates: Sequence[Card] = (),
    candidates_note: str = "",
) -> str:
    """The whole report as one HTML string. All text arguments are plain text (escaped here);
    ``candidates`` are the training examples to inspect, ``candidates_note`` says what they are."""
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
    inspect = ""
    if candidates or candidates_note:
        cards = "".join(_card(c) for c in candidates)
        inspect = (
            f'<h2>Candidates to inspect</h2><p class="note">{esc(candidates_note)}'
            + (" The score shown is the sum of its scores on those test examples." if candidates else "")
            + f'</p><div class="row harmful candidates">{cards}</div>'
        )
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
        f"<h2>Test examples</h2>{''.join(body)}{inspect}{plot}{note_html}"
        f"<script>{_CHECK_SCRIPT}</script></body></html>\n"
    )
