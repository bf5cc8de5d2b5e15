"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_quick_start_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "most helpful:" in out and "most harmful:" in out
    scores = namespace["scores"]
    assert scores.shape == (3, len(namespace["data"].x_train)) and torch.isfinite(scores).all()
    assert (namespace["top"].helpful_scores[:, 0] > 0).all()
