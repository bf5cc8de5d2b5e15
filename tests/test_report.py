"""The HTML report: exact pictures, escaping of every user string, and a real browser rendering it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from explain_support import tiny_job
from influencer.app.commands.explain import explain
from influencer.app.report.page import Card, Panel, render_report
from influencer.app.report.pictures import ExampleView, image_layout, png_bytes
from influencer.app.settings.explain import ExplainConfig

HOSTILE = "<script>alert('x')</script>&\"'"


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_png_round_trip_is_exact():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(png_bytes(gray)), gray)
    np.testing.assert_array_equal(decode(png_bytes(rgb)), rgb)
    with pytest.raises(ValueError, match="needs"):
        png_bytes(np.zeros((2, 2, 4), np.uint8))


def test_image_layout():
    assert image_layout((8, 8)) == "gray"
    assert image_layout((1, 28, 28)) == "gray"
    assert image_layout((3, 32, 32)) == "rgb"
    assert image_layout((64,)) is None
    assert image_layout((5, 8, 8)) is None
    assert image_layout((2, 3)) is None


def _uri_pixels(fragment: str) -> np.ndarray:
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', fragment).group(1)
    return decode(base64.b64decode(uri))


def test_example_view_pictures_share_one_range():
    sample = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 2.0)])
    view = ExampleView(sample, invert=False)
    half = torch.full((1, 4, 4), 1.0)
    assert (_uri_pixels(view.html(half, "x")) == 128).all()
    assert (_uri_pixels(ExampleView(sample, invert=True).html(sample[1], "x")) == 0).all()
    rgb = ExampleView(torch.rand(2, 3, 5, 6))
    assert _uri_pixels(rgb.html(torch.rand(3, 5, 6), "x")).shape == (5, 6, 3)


def test_feature_table_escapes_names():
    view = ExampleView(torch.randn(3, 10), feature_names=[HOSTILE, "b"], max_features=3)
    fragment = view.html(torch.arange(10.0), "x")
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment
    assert "x[2]" in fragment and "10 values" in fragment


def test_render_escapes_every_string_and_allows_only_its_own_script():
    visual = ExampleView(torch.rand(2, 8, 8)).html(torch.rand(8, 8), HOSTILE)
    card = Card(visual, (HOSTILE, "label " + HOSTILE), score=-0.5)
    page = render_report(
        HOSTILE, HOSTILE, [(HOSTILE, HOSTILE)], [Panel(card, False, (card,), (card,))], None, [HOSTILE]
    )
    assert HOSTILE not in page
    assert page.count("<script>") == 1  # the report's own
    assert "alert(&#x27;x&#x27;)" in page and "&amp;&quot;&#x27;" in page
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page  # the CSP names exactly that script
    assert "default-src 'none'" in page  # no network: images are data: URIs only
    assert page.count("<img ") == 3


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """An explain run whose job name and class names try to inject markup."""
    out = tmp_path_factory.mktemp("report") / "run"
    job = tiny_job(classes=[f"{HOSTILE}{c}" for c in range(10)])
    job.name = HOSTILE
    config = ExplainConfig(out=str(out), test_ids=(0, 7, 11), top_k=3, batch_size=64, progress=False)
    return explain(config, job, console=False), job


def test_report_shows_the_expected_pictures(hostile_run):
    result, job = hostile_run
    page = (result.run_dir / "report.html").read_text()
    view = ExampleView(job.train.take(torch.arange(120))[0])
    summary = json.loads((result.run_dir / "summary.json").read_text())
    panels = page.split("<h2>Influence vs. distance")[0].split('<section class="panel">')[1:]
    assert len(panels) == 3
    x_test, x_train = job.test.take(torch.arange(40))[0], job.train.take(torch.arange(120))[0]
    for panel, entry in zip(panels, summary["tests"], strict=True):
        srcs = re.findall(r'src="(data:image/png;base64,[^"]+)"', panel)
        expected = [view.html(x_test[entry["test_id"]], "")]
        expected += [view.html(x_train[i], "") for i in entry["helpful_ids"] + entry["harmful_ids"]]
        assert srcs == [re.search(r'src="([^"]+)"', e).group(1) for e in expected]
        for i, score in zip(entry["helpful_ids"], entry["helpful_scores"], strict=True):
            assert f"<div>#{i}</div>" in panel and f"{score:+.3g}" in panel
    assert page.count("<img ") == 3 * (1 + 2 * 3) + 1  # + the influence-vs-distance plot
    plot = (result.run_dir / "influence_vs_distance.png").read_bytes()
    assert base64.b64encode(plot).decode() in page and decode(plot).shape[2] in (3, 4)


def test_report_escapes_user_strings(hostile_run):
    result, _ = hostile_run
    page = (result.run_dir / "report.html").read_text()
    assert HOSTILE not in page and "<script>alert" not in page
    assert page.count("<script>") == 1
    assert "label: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;&#x27;" in page


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser_or_skip() -> str:
    browser = _browser()
    if browser is None:
        if os.environ.get("INFLUENCER_REQUIRE_BROWSER"):
            pytest.fail("INFLUENCER_REQUIRE_BROWSER is set but no chromium/google-chrome binary was found")
        pytest.skip("no headless browser (chromium) on this machine")
    return browser


def _dom_command(browser: str, profile, page) -> list[str]:
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]


def test_text_report_renders_in_headless_chromium(tmp_path):
    """A text classifier's report: the sentences and tokens are text in the rendered page, no
    picture but the check's, and the user's strings stay text."""
    browser = _browser_or_skip()
    pytest.importorskip("transformers")
    from explain_support import text_job

    job = text_job()
    job.name = HOSTILE
    config = ExplainConfig(
        out=str(tmp_path / "run"),
        num_test=3,
        top_k=2,
        progress=False,
        estimator="exact",
        damping=1e-3,  # the classifier's Hessian alone is singular on this data
        params=("classifier",),
    )
    result = explain(config, job, console=False)
    cmd = _dom_command(browser, tmp_path / "profile", result.run_dir / "report.html")
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-images-ok="0"' in dom and 'data-images-broken="0"' in dom  # the script ran (CSP)
    assert dom.count("<script") == 1 and "&lt;script&gt;alert('x')&lt;/script&gt;" in dom
    assert dom.count('<div class="text"') >= 3 * (1 + 2 * 2) and '<span class="tok">[CLS]</span>' in dom


def test_report_renders_in_headless_chromium(hostile_run, tmp_path):
    browser = _browser_or_skip()
    result, _ = hostile_run
    report = result.run_dir / "report.html"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        report.resolve().as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    page = report.read_text()
    images = page.count("<img ")
    assert f'data-images-ok="{images}"' in dom, dom[:500]  # the script ran (CSP) and saw every image
    assert 'data-images-broken="0"' in dom
    assert dom.count("<script") == 1  # the user's strings stayed text
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom

    # The check itself can fail: a copy with one damaged picture is reported as broken.
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    cmd[-1] = broken.as_uri()
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f'data-images-ok="{images - 1}"' in dom and 'data-images-broken="1"' in dom
