"""The core needs only torch, numpy and tqdm; without an extra, what needs it says so in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from influencer._kernel.extras import MissingExtraError, missing, require
from influencer.app.commands.explain import explain
from influencer.app.settings.explain import ExplainConfig
from influencer.plotting import pyplot

OPTIONAL = ("click", "matplotlib", "sklearn", "tomli", "mnist1d", "PIL")


def _without_optional(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which no optional package can be imported."""
    block = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", block + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def core_only() -> subprocess.CompletedProcess:
    """A fresh interpreter without the optional packages imports every module of influencer (printing
    those that name a missing extra), then runs the ``influencer explain`` console script."""
    return _without_optional(
        """
        import importlib, pkgutil
        import influencer
        from influencer._kernel.extras import MissingExtraError
        for info in pkgutil.walk_packages(influencer.__path__, "influencer."):
            if info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except MissingExtraError as exc:
                print(info.name, "->", exc)
        print("imported", flush=True)
        sys.argv = ["influencer", "explain"]
        from influencer.app.entry import main
        main()
        """
    )


def test_every_module_imports_with_the_core_alone_or_names_its_extra(core_only):
    assert core_only.stdout.rstrip().endswith("imported"), core_only.stderr[-3000:]
    line = "influencer.app.commands.options -> the influencer command line needs click (not installed)"
    assert line in core_only.stdout


def test_the_command_without_the_app_extra_prints_one_line(core_only):
    assert core_only.returncode == 1
    assert "Traceback" not in core_only.stderr
    names = "click, matplotlib, scikit-learn" + (", tomli" if sys.version_info < (3, 11) else "")
    assert core_only.stderr.splitlines() == [
        f"influencer: the influencer command needs {names} (not installed): "
        "pip install 'influencer[app]' (from a source checkout: pip install -e '.[app]')"
    ]


def test_figures_without_matplotlib_name_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        MissingExtraError, match=r"needs matplotlib \(not installed\): pip install 'influencer\[plot\]'"
    ):
        pyplot()


def test_digits_job_without_scikit_learn_names_the_data_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    config = ExplainConfig(out=str(tmp_path / "run"), progress=False)
    with pytest.raises(MissingExtraError, match=r"digits job .* needs scikit-learn .*'influencer\[data\]'"):
        explain(config, console=False)


def test_require_and_missing():
    assert require("numpy", "x").__name__ == "numpy"
    assert missing(["numpy", "no_such_package_here"]) == ["no_such_package_here"]
    with pytest.raises(
        MissingExtraError, match=r"needs no_such_package_here .*pip install no_such_package_here"
    ):
        require("no_such_package_here", "this check")
