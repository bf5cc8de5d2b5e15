"""The README's quick start runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (tomli comes with the app extra)
    import tomli as tomllib


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


def _setup_commands(readme: str) -> list[str]:
    """The README's first two commands (run the job; run the tests), each one shell line."""
    return [line.strip() for line in readme.splitlines() if line.startswith("    python3 -m venv")][:2]


def test_setup_commands_install_the_extras_they_need_and_ci_runs_the_test_command():
    root = Path(__file__).parents[1]
    run, test = _setup_commands((root / "README.md").read_text())
    assert "pip install torch==2.13.0 -e '.[app]'" in run and run.endswith("&& influencer explain")
    assert "pip install torch==2.13.0 -e '.[dev]'" in test and test.endswith("&& python -m pytest -q")
    with open(root / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch", "numpy", "tqdm", "safetensors"]
    extras = project["optional-dependencies"]
    assert {"click>=8.1", "matplotlib>=3.7", "scikit-learn>=1.2"} <= set(extras["app"])
    assert extras["all"] == ["influencer[app,plot,data,hf]"] and "influencer[all]" in extras["dev"]
    assert project["scripts"]["influencer"] == "influencer.app.entry:main"
    # CI installs and tests exactly as the README's test command does.
    ci = (root / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0 -e '.[dev]'" in ci
    assert "\npython -m pytest -q\n" in ci


def test_reproductions_the_readme_names_exist():
    root = Path(__file__).parents[1]
    names = set(re.findall(r"reproductions\.(\w+)", (root / "README.md").read_text()))
    assert len(names) >= 9
    missing = sorted(n for n in names if not (root / "reproductions" / f"{n}.py").is_file())
    assert not missing, f"the README names reproductions that do not exist: {missing}"
