"""How the report shows examples of any kind: texts, feature tables, pictures, anything else; and
explain runs on a text classifier and a tabular model whose reports show the sentences and the
feature names."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

from explain_support import WordTokenizer, tabular_job, text_job
from influencer import Exact, Influence
from influencer.app.commands.explain import explain
from influencer.app.job.job import Job
from influencer.app.report.display import (
    GenericDisplay,
    ImageDisplay,
    TableDisplay,
    TextDisplay,
    choose_display,
)
from influencer.app.settings.explain import ExplainConfig
from influencer.errors import ConfigError
from influencer.uses import PerturbationInfluence

pytestmark = pytest.mark.usefixtures("one_thread")
HOSTILE = "<script>alert('x')</script>&\"'"


def encoded(tok: WordTokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return {**tok(texts), "labels": torch.zeros(len(texts), dtype=torch.long)}


def test_text_display_decodes_without_padding_and_trims_long_texts():
    long = " ".join(["good"] * 60)
    tok = WordTokenizer(["the", "movie", "was", "good", "<b>bold</b>"])
    batch = encoded(tok, ["the movie was good", long, "<b>bold</b>"])
    short, trimmed, hostile = TextDisplay(tok, max_chars=40).html(batch)
    assert '<div class="text" title="the movie was good">the movie was good</div>' in short
    tokens = re.findall(r'<span class="tok">([^<]*)</span>', short)
    assert tokens == ["[CLS]", "the", "movie", "was", "good", "[SEP]"]  # padding removed, specials kept
    assert "[PAD]" not in trimmed + short
    shown = re.search(r'<div class="text" title="([^"]*)">([^<]*)</div>', trimmed)
    assert shown.group(1) == long and shown.group(2).endswith("\u2026") and len(shown.group(2)) == 40
    assert f'<div class="full">{long}</div>' in trimmed and "62 tokens" in trimmed
    capped = TextDisplay(tok, max_tokens=10).html(batch)[1]
    assert capped.count('class="tok"') == 10 and "\u2026 52 more" in capped
    assert "<b>" not in hostile and "&lt;b&gt;bold&lt;/b&gt;" in hostile


def test_text_display_without_mask_uses_the_pad_id_and_takes_functions():
    tok = WordTokenizer(["a", "b"])
    ids = tok(["a b", "a"])["input_ids"]  # padded with 0 = pad_token_id
    (_, two) = TextDisplay(tok).html({"input_ids": ids})
    assert "[PAD]" not in two and two.count('class="tok"') == 3
    assert "token ids: 1 4 5 2" in TextDisplay().html({"input_ids": ids})[0]  # no tokenizer: the ids
    custom = TextDisplay(decode=lambda ids: f"{len(ids)} ids {HOSTILE}", pad_id=0).html({"input_ids": ids})
    assert "4 ids" in custom[0] and "3 ids" in custom[1] and HOSTILE not in custom[0]
    texts = TextDisplay(texts=lambda batch: [f"row {i}" for i in range(len(batch["input_ids"]))])
    assert ">row 1<" in texts.html({"input_ids": ids})[1]
    with pytest.raises(ConfigError, match="one of"):
        TextDisplay(tok, decode=str)
    with pytest.raises(ConfigError, match="decode"):
        TextDisplay(object())


def test_text_display_with_a_hugging_face_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "food": 5, "was": 6, "great": 7}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    batch = tok(["the food was great", "the food"], padding=True, return_tensors="pt")
    first, second = TextDisplay(tok).html(dict(batch))
    assert ">the food was great</div>" in first and ">the food</div>" in second
    assert "[PAD]" not in second and second.count('class="tok"') == 2


def test_table_display_orders_features_by_importance_and_escapes_names():
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    names = ["a", "b", HOSTILE, "d"]
    (plain,) = TableDisplay(names).html((rows, torch.zeros(1)))
    assert re.findall(r'<tr><td title="[^"]*">([^<]*)</td>', plain) == ["a", "b", html.escape(HOSTILE), "d"]
    (ranked,) = TableDisplay(names, importance=[0.1, -5.0, 0.0, 2.0], max_features=2).html((rows, None))
    assert re.findall(r'<tr><td title="[^"]*">([^<]*)</td>', ranked) == ["b", "d"]
    assert "2 more of 4 values" in ranked and 'title="a = 1; ' in ranked and HOSTILE not in ranked
    with pytest.raises(ConfigError, match="3 feature names for rows of 4"):
        TableDisplay(["a", "b", "c"]).html((rows, None))


def test_generic_display_shows_shapes_and_first_values():
    batch = {"signal": torch.arange(20.0).reshape(2, 10), HOSTILE: torch.tensor([[1, 2], [3, 4]])}
    first, _ = GenericDisplay(max_values=3).html(batch)
    assert "float32 (10,)</span> 0, 1, 2, \u2026" in first and "int64 (2,)</span> 1, 2" in first
    assert HOSTILE not in first


def test_choose_display_from_the_data():
    tok = WordTokenizer(["a"])
    assert isinstance(choose_display(encoded(tok, ["a"]), tokenizer=tok), TextDisplay)
    assert isinstance(choose_display(["a sentence"]), TextDisplay)
    assert isinstance(choose_display((torch.rand(2, 1, 8, 8), torch.zeros(2))), ImageDisplay)
    table = choose_display((torch.rand(2, 3), torch.zeros(2)), feature_names=["u", "v", "w"])
    assert isinstance(table, TableDisplay) and table.feature_names == ["u", "v", "w"]
    assert isinstance(choose_display((torch.rand(2, 5, 7, 3), torch.zeros(2))), GenericDisplay)


def test_job_display_settings():
    job = tabular_job()
    assert isinstance(job.chosen_display(), TableDisplay)
    fn = Job(job.task, job.model, job.train, job.test, display=lambda b: ["x"] * len(b[0]))
    assert isinstance(fn.display, TextDisplay) and fn.display.html(job.train.take(torch.arange(2))) != []
    n, m = len(job.train), len(job.test)
    words = Job(job.task, job.model, job.train, job.test, shown=([f"t{i}" for i in range(n)], ["s"] * m))
    assert words.shown_batch("train", torch.tensor([3, 1])) == ["t3", "t1"]
    assert isinstance(words.chosen_display(), TextDisplay)
    with pytest.raises(ConfigError, match="one entry per example"):
        Job(job.task, job.model, job.train, job.test, shown=(["a"], ["b"]))
    with pytest.raises(ConfigError, match="display must be"):
        Job(job.task, job.model, job.train, job.test, display=42)


# ---- whole runs -----------------------------------------------------------------------------------


def run(tmp_path, job, **changes):
    values = {
        "out": str(tmp_path / "run"),
        "top_k": 3,
        "num_test": 4,
        "progress": False,
        "estimator": "exact",
        "damping": 1e-3,
    }
    result = explain(ExplainConfig(**{**values, **changes}), job, console=False)
    page = (tmp_path / "run" / "report.html").read_text()
    log = (tmp_path / "run" / "explain.log").read_text()
    return result, page, json.loads((tmp_path / "run" / "summary.json").read_text()), log


def test_text_classifier_report_shows_the_sentences(tmp_path):
    pytest.importorskip("transformers")
    job = text_job()
    tok = job.tokenizer
    result, page, summary, _ = run(tmp_path, job, params=("classifier",))
    assert result.scores.shape == (4, 48) and "influence_vs_distance.png" not in summary["files"].values()
    ids = job.train.take(torch.arange(48))
    sentences = [
        tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
        for r, m in zip(ids["input_ids"], ids["attention_mask"], strict=True)
    ]
    for entry in summary["tests"]:
        for i in entry["helpful_ids"] + entry["harmful_ids"]:
            assert f">{sentences[i]}</div>" in page  # every shown training example as its sentence
    assert "[PAD]" not in page and '<span class="tok">[CLS]</span>' in page
    assert "label negative" in page or "label positive" in page


def test_text_classifier_head_on_cached_features_matches_the_whole_network(tmp_path):
    pytest.importorskip("transformers")
    job = text_job(head="classifier")
    viewed, page, summary, log = run(tmp_path / "a", job)
    full, _, _, _ = run(tmp_path / "b", job, params=("classifier",), test_ids=tuple(viewed.test_ids.tolist()))
    np.testing.assert_allclose(viewed.scores, full.scores, rtol=1e-8, atol=1e-12)
    assert summary["head"] == "classifier" and html.escape("the head 'classifier' alone") in page
    assert "the network ran once over the 48 training examples" in log
    again, _, _, log = run(tmp_path / "a", job)
    assert re.search(r"features-[0-9a-f]+: reusing 2 cached entries", log)  # from the job cache
    assert np.array_equal(again.scores, viewed.scores)


def test_tabular_report_shows_feature_names_and_candidates(tmp_path):
    job = tabular_job()
    _, page, summary, log = run(tmp_path, job, num_test=8, top_k=5)
    assert "alcohol" in page and '<table class="feat">' in page and "Influence vs. distance" in page
    assert summary["files"]["plot"] == "influence_vs_distance.png"
    assert summary["test_selection"].startswith("chosen from 44: ")
    assert "correctly classified spread over labels" in summary["test_selection"]
    assert "<td>test examples</td><td>chosen from 44" in page
    # Candidates: recomputed from the per-test lists in the summary.
    counts: dict[int, list[int]] = {}
    for entry in summary["tests"]:
        for i, v in zip(entry["harmful_ids"], entry["harmful_scores"], strict=True):
            if v < 0:
                counts.setdefault(i, []).append(entry["test_id"])
    expected = {i: t for i, t in counts.items() if len(t) >= 2}
    found = {c["train_id"]: c["test_ids"] for c in summary["candidates_to_inspect"]}
    assert found == expected and found, "this run should have recurring harmful examples"
    first = summary["candidates_to_inspect"][0]
    assert first["harmful_to"] == max(len(t) for t in expected.values())
    assert "<h2>Candidates to inspect</h2>" in page and f"harmful to {first['harmful_to']} of 8" in page
    assert f"candidate to inspect: training #{first['train_id']}" in log
    _, _, summary, _ = run(tmp_path / "given", job, test_ids=(2, 0))
    assert summary["test_selection"] == "given (#2, #0)"


def test_tabular_report_lists_features_by_their_share_of_the_score(tmp_path):
    job = tabular_job()
    _, page, summary, _ = run(tmp_path, job, test_ids=(3,), top_k=2)
    assert "gradient x input, relative to the average training example" in page
    # The first helpful training example's table, recomputed through the library.
    inf = Influence(job.model, job.task, job.train, estimator=Exact(damping=1e-3)).fit()
    x_train = job.train.take(torch.arange(len(job.train)))[0]
    i = summary["tests"][0]["helpful_ids"][0]
    found = PerturbationInfluence(inf).attribution(job.test.take(torch.tensor([3])), [i], x_train.mean(0))
    shares = found.gradient_x_input[0, 0]
    order = torch.argsort(-shares.abs(), stable=True)[:8]
    panel = page.split('<div class="row helpful">')[1]
    table = re.search(r'<table class="feat">(.*?)</table>', panel).group(1)
    rows = re.findall(r'<tr><td title="[^"]*">([^<]*)</td><td>([^<]*)</td><td[^>]*>([^<]*)</td></tr>', table)
    assert [r[0] for r in rows] == [job.feature_names[k] for k in order.tolist()]
    assert [r[2] for r in rows] == [f"{float(shares[k]):+.2g}" for k in order.tolist()]
