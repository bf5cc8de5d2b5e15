"""A model's fingerprint sees all of the user's own code its class reaches: an edit to a helper in
another module, or to a constant there, changes it; code that cannot be read makes it unverifiable."""

from __future__ import annotations

import contextlib
import importlib
import sys
import textwrap
import types
import uuid

import pytest
import torch

from influencer._kernel.fingerprint import (
    model_fingerprint,
    reachable_user_modules,
    task_fingerprint,
    unverifiable,
)

JOB = """
import torch
import {helpers}
from {helpers} import scale_of


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return {helpers}.act(self.lin(x)) * scale_of(x)
"""

HELPERS = """
import torch
from . import deeper

SCALE = {scale}


def act(x):
    return {body}


def scale_of(x):
    return deeper.FACTOR
"""

DEEPER = "FACTOR = {factor}\n"


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A job module importing a helper package (``pkg.helpers``) that imports ``pkg.deeper``, under
    fresh names; returns ``write(**edits)`` which (re)writes the files and returns the model's class
    digest as a fresh import would see it."""
    tag = uuid.uuid4().hex[:8]
    job, package = f"job_{tag}", f"pkg_{tag}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body="torch.tanh(x) * SCALE", scale="1.0", factor="2.0"):
        (tmp_path / f"{job}.py").write_text(textwrap.dedent(JOB.format(helpers=f"{package}.helpers")))
        (tmp_path / package / "helpers.py").write_text(HELPERS.format(scale=scale, body=body))
        (tmp_path / package / "deeper.py").write_text(DEEPER.format(factor=factor))
        for name in [n for n in sys.modules if n == job or n.startswith(package)]:
            del sys.modules[name]
        importlib.invalidate_caches()
        model = importlib.import_module(job).Net()
        return model_fingerprint(model, dict(model.state_dict()))["classes"][f"{job}.Net"]

    yield write, job, package
    for name in [n for n in sys.modules if n == job or n.startswith(package)]:
        del sys.modules[name]


def test_editing_a_helper_in_another_module_changes_the_fingerprint(user_code):
    write, job, package = user_code
    base = write()
    assert base is not None and write() == base  # reproducible: the same code, the same digest
    assert write(body="torch.relu(x) * SCALE") != base  # a helper's body
    assert write(scale="1.5") != base  # a constant the helper reads
    assert write(factor="3.0") != base  # two imports away (a relative import)
    assert write() == base
    # only the user's own modules are followed: not torch, not the standard library
    assert set(reachable_user_modules(job)) == {job, f"{package}.helpers", f"{package}.deeper", package}


def test_a_constant_changed_at_run_time_changes_the_fingerprint(user_code):
    write, job, package = user_code
    base = write()
    helpers = sys.modules[f"{package}.helpers"]
    helpers.SCALE = 4.0
    model = sys.modules[job].Net()
    assert model_fingerprint(model, dict(model.state_dict()))["classes"][f"{job}.Net"] != base


def test_a_helper_module_without_readable_code_makes_the_model_unverifiable(user_code):
    write, job, package = user_code
    write()
    made = types.ModuleType(f"{package}.generated")  # code made at run time: no file to read
    exec("def act(x):\n    return x\n", made.__dict__)
    sys.modules[made.__name__] = made
    sys.modules[job].generated = made
    model = sys.modules[job].Net()
    fingerprint = model_fingerprint(model, dict(model.state_dict()))
    assert fingerprint["classes"][f"{job}.Net"] is None
    gradients = {"model": fingerprint, "task": {"classes": {}, "attributes": {}}}
    assert unverifiable(gradients) == [f"{job}.Net"]


def test_a_function_held_by_the_task_sees_its_helpers(user_code):
    from influencer import ClassificationTask

    write, job, _ = user_code
    write()
    task = ClassificationTask()
    task.transform = sys.modules[job].Net.forward
    before = task_fingerprint(task)["attributes"]["transform"]
    write(body="torch.sigmoid(x) * SCALE")
    task.transform = sys.modules[job].Net.forward
    assert task_fingerprint(task)["attributes"]["transform"] != before


def test_library_models_fingerprint_as_before():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    classes = model_fingerprint(model, dict(model.state_dict()))["classes"]
    assert classes == {}  # torch's own classes are not the user's code


CLASSES = """
import functools


class Plain:
    x = 1


@functools.total_ordering
class Decorated:
    def __lt__(self, other):
        return False

    class Inner:
        pass


def factory():
    class Local:
        pass

    return Local


try:
    class Guarded:
        a = 1
except ImportError:
    class Guarded:
        a = 2


Dynamic = type("Dynamic", (), {})
"""


def test_class_source_is_what_inspect_finds_and_follows_edits(tmp_path, monkeypatch):
    """One parse per file gives each class's source as ``inspect.getsource`` does (decorated, nested,
    local to a function, defined twice: the first), None where it finds none (a class made by
    ``type``), and the new text once the file changes."""
    import inspect

    from influencer._kernel.fingerprint import _class_source

    name = f"classes_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CLASSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module(name)
        classes = [module.Plain, module.Decorated, module.Decorated.Inner, module.factory(), module.Guarded]
        for cls in classes:
            assert _class_source(cls) == inspect.getsource(cls)
        assert "a = 1" in _class_source(module.Guarded)
        assert _class_source(module.Dynamic) is None
        with pytest.raises(OSError):
            inspect.getsource(module.Dynamic)
        assert _class_source(int) is None  # built in: no source

        (tmp_path / f"{name}.py").write_text(CLASSES.replace("x = 1", "x = 22"))  # another size
        assert "x = 22" in _class_source(module.Plain)
    finally:
        sys.modules.pop(name, None)


def test_class_spans_from_compiled_code_are_those_of_a_parse():
    """The spans read from a module's compiled code equal those of a parse of its source, class by
    class, over this library's modules, some of the standard library's and transformers' GPT-2
    (decorated, nested, local classes; classes whose last statement is a method, a docstring)."""
    import argparse
    import ast
    import concurrent.futures.thread
    import dataclasses
    import json.decoder
    import linecache
    import logging

    from influencer._kernel.fingerprint import _class_spans, _compiled_class_spans

    if not hasattr(types.CodeType, "co_qualname"):
        pytest.skip("Python before 3.11: the parse is used")
    modules = [argparse, concurrent.futures.thread, dataclasses, json.decoder, logging]
    modules += [
        m for name, m in sorted(sys.modules.items()) if name.startswith("influencer") and m is not None
    ]
    with contextlib.suppress(ImportError):
        import transformers.models.gpt2.modeling_gpt2 as gpt2

        modules.append(gpt2)
    compared = 0
    for module in modules:
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        parsed = _class_spans(ast.parse("".join(linecache.getlines(file))))
        compiled = _compiled_class_spans(module)
        assert compiled is not None, module.__name__
        assert {name: compiled.get(name) for name in parsed} == parsed, module.__name__
        compared += len(parsed)
    assert compared > 100
