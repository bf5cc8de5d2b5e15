"""Fingerprints: sha256 digests of what a computed result depends on (weights, data, settings).

Caches key their entries by these, so a changed input is recomputed rather than served stale.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import json
import linecache
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from influencer._kernel.data import Examples, TensorExamples
from influencer._kernel.task import Task


def _update_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    # Viewing as bytes works for every dtype (bfloat16 included) and copies nothing.
    h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


def hash_tensors(tree: Any) -> str:
    """sha256 over the structure, dtypes, shapes and bytes of every tensor/array leaf of ``tree``."""
    h = hashlib.sha256()
    leaves, spec = tree_flatten(tree)
    h.update(str(spec).encode())
    for x in leaves:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if isinstance(x, Tensor):
            _update_tensor(h, x)
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def hash_module(model: torch.nn.Module) -> str:
    """sha256 of a module's weights and buffers (names, dtypes, shapes and values)."""
    return hash_tensors(dict(model.state_dict()))


def hash_examples(data: Examples, batch_size: int = 1024) -> str:
    """sha256 of every example's tensors, in order (a dataset is read once, chunk by chunk)."""
    if isinstance(data, TensorExamples):
        return hash_tensors(data.tree)
    h = hashlib.sha256()
    for _, batch in data.chunks(batch_size):
        h.update(hash_tensors(batch).encode())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _module_source(module_name: str) -> str | None:
    """The source text of a module's file, or None when there is none to read (REPL, notebooks,
    generated or compiled code)."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _update_code(h: Any, code: types.CodeType) -> None:
    """Feed a code object's instructions, names and constants (nested code too) into ``h``."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _update_code(h, const)
        else:
            h.update(_stable_repr(const).encode())


def _stable_repr(value: Any) -> str:
    """``repr`` that is the same in every process: sets sorted (string hashing is randomised per
    process), objects whose ``repr`` is an address named by their type."""
    if isinstance(value, (frozenset, set)):
        return "{" + ", ".join(sorted(_stable_repr(v) for v in value)) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_stable_repr(v) for v in value) + ")"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def _functions_of(obj: Any) -> list[tuple[str, types.FunctionType]]:
    """The Python functions a class or module defines itself (methods, properties, helpers)."""
    out = []
    for name, value in sorted(vars(obj).items()):
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            out += [(f"{name}.{f.__name__}", f) for f in (value.fget, value.fset) if inspect.isfunction(f)]
        elif inspect.isfunction(value) and (not inspect.ismodule(obj) or value.__module__ == obj.__name__):
            out.append((name, value))
        elif inspect.ismodule(obj) and isinstance(value, type) and value.__module__ == obj.__name__:
            out += [(f"{name}.{n}", f) for n, f in _functions_of(value)]
    return out


def loaded_code_digest(obj: Any) -> str:
    """sha256 of the code a class or module runs now, as loaded (not as its file reads now): a file
    edited after it was imported then gives another fingerprint than a fresh import of it would."""
    h = hashlib.sha256()
    for name, function in _functions_of(obj):
        h.update(name.encode())
        _update_code(h, function.__code__)
        h.update(_stable_repr(function.__defaults__).encode())
    return h.hexdigest()


# source file -> ((mtime_ns, size), its lines, {class qualname: (first line, end line)}): finding a
# class with ``inspect.getsource`` parses its whole module, once per class (a Hugging Face model's
# twenty classes re-parsed the same few long files)
_CLASS_SPANS: dict[str, tuple[tuple[int, int], list[str], dict[str, tuple[int, int]]]] = {}


def _class_spans(tree: ast.Module) -> dict[str, tuple[int, int]]:
    """Qualified name -> (index of its first line, decorators included; its last line number) of
    every class a module defines, the first definition of a name as ``inspect`` finds it (depth
    first, a function's classes under ``<locals>``)."""
    spans: dict[str, tuple[int, int]] = {}
    # a class statement can only be inside statements (and handlers, match cases), never inside an
    # expression: only those lists are walked, in the order of the nodes' fields
    nested = (ast.stmt, ast.excepthandler, ast.match_case)

    def visit(nodes: list[Any], stack: tuple[str, ...]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, (*stack, node.name, "<locals>"))
            elif isinstance(node, ast.ClassDef):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                spans.setdefault(".".join((*stack, node.name)), (first - 1, node.end_lineno or first))
                visit(node.body, (*stack, node.name))
            else:
                for field in node._fields:
                    value = getattr(node, field, None)
                    if isinstance(value, list) and value and isinstance(value[0], nested):
                        visit(value, stack)

    visit(tree.body, ())
    return spans


def _compiled_class_spans(module: types.ModuleType) -> dict[str, tuple[int, int]] | None:
    """:func:`_class_spans` from the module's compiled code instead of a parse of its source: a
    class body's code object holds the class's qualified name, its first line (decorators
    included) and, in its instructions' positions, the end of its last statement. The loader reads
    the file's cached bytecode (compiling the source only when that is stale), several times
    faster than parsing the source into an AST (a large module of transformers: 39 ms against 6).
    None where the loader cannot give the code (Python before 3.11 has no ``co_qualname``)."""
    get_code = getattr(getattr(module, "__loader__", None), "get_code", None)
    if get_code is None or not hasattr(types.CodeType, "co_qualname"):
        return None
    try:
        code = get_code(module.__name__)
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    if not isinstance(code, types.CodeType):
        return None
    spans: dict[str, tuple[int, int]] = {}
    # a function's, lambda's or comprehension's code is optimised and has its own locals; a class
    # body's has neither
    function = inspect.CO_OPTIMIZED | inspect.CO_NEWLOCALS

    def visit(outer: types.CodeType) -> None:
        for inner in outer.co_consts:
            if isinstance(inner, types.CodeType):
                if not inner.co_flags & function:
                    ends = [end for _, end, _, _ in inner.co_positions() if end is not None]
                    spans.setdefault(inner.co_qualname, (inner.co_firstlineno - 1, max(ends, default=0)))
                visit(inner)

    visit(code)
    return spans


def _class_source(cls: type) -> str | None:
    """The source text of ``cls`` (its definition in its module's file, as ``inspect.getsource``
    finds it), or None where Python cannot show it. Each file's classes are located once (from its
    compiled code, :func:`_compiled_class_spans`, else by a parse) while it keeps its modification
    time and size (when ``linecache``, which ``inspect`` reads, would reread it too)."""
    module = sys.modules.get(cls.__module__)
    try:
        file = inspect.getsourcefile(cls)
    except TypeError:  # built in
        return None
    try:
        info = os.stat(file) if file and module is not None else None
    except OSError:
        info = None
    if info is None:  # no file to watch (a zip import, say): inspect's own search, not remembered
        try:
            return inspect.getsource(cls)
        except (OSError, TypeError):
            return None
    assert file is not None and module is not None
    key = (info.st_mtime_ns, info.st_size)
    cached = _CLASS_SPANS.get(file)
    if cached is None or cached[0] != key:
        linecache.checkcache(file)
        lines = linecache.getlines(file, module.__dict__)
        spans = _compiled_class_spans(module) if lines else {}
        try:
            if spans is None:
                spans = _class_spans(ast.parse("".join(lines)))
        except (SyntaxError, ValueError):  # the file on disk no longer parses
            return None
        cached = _CLASS_SPANS[file] = (key, lines, spans)
    span = cached[2].get(cls.__qualname__)
    return "".join(cached[1][span[0] : span[1]]) if span is not None else None


def source_digest(cls: type) -> str | None:
    """sha256 of a class's source code, of its module's whole source file (both as on disk and as
    loaded) and of every module of the user's own code that module reaches (:func:`user_code_digest`),
    or None when Python cannot show one of them (built-ins, the REPL, notebooks, ``exec``-generated
    code).

    The module's file is part of it because a method may call the module's functions or read its
    constants: an edit anywhere in that file may change what the class computes; the modules it
    imports (a ``helpers.act()`` the forward calls, a ``helpers.SCALE`` it reads) likewise.
    """
    own = _class_source(cls)
    if own is None:
        return None
    source = _module_source(cls.__module__)
    if source is None:
        return None
    reached = user_code_digest(cls.__module__)
    if reached is None:
        return None
    loaded = loaded_code_digest(cls) + loaded_code_digest(sys.modules[cls.__module__])
    text = f"{cls.__module__}.{cls.__qualname__}\n{own}\n{source}\n{loaded}\n{reached}"
    return hashlib.sha256(text.encode()).hexdigest()


# Never the user's own code, wherever they are installed (an editable install is not in site-packages).
_LIBRARIES = ("torch", "numpy", "influencer", "scipy", "transformers", "sklearn", "pandas")
_MAX_MODULES = 2000


@functools.cache
def _library_roots() -> tuple[str, ...]:
    """Directories of the standard library and of installed packages (site-packages)."""
    import site
    import sysconfig

    roots = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    with contextlib.suppress(AttributeError):  # virtualenv's old site.py lacks them
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


def _user_file(module: types.ModuleType) -> str | None:
    """``"<file>"`` of a module of the user's own code; ``""`` for user code without a readable
    file; None for everything else (standard library, installed packages, torch, influencer)."""
    name = module.__name__
    top = name.split(".")[0]
    if top in _LIBRARIES or top in sys.stdlib_module_names or name in sys.builtin_module_names:
        return None
    file = getattr(module, "__file__", None)
    if file is None:
        # a namespace package has no code of its own; a module made at run time (the REPL's or a
        # notebook's __main__, types.ModuleType) has code that cannot be read
        return None if hasattr(module, "__path__") else ""
    real = os.path.realpath(file)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts or real.startswith(_library_roots()):
        return None
    return real


_IMPORTS: dict[str, tuple[tuple[str, int], ...]] = {}  # by the sha256 of a file's bytes


def _file_facts(path: str) -> tuple[str, tuple[tuple[str, int], ...]] | None:
    """sha256 of a file's bytes (read now) and the modules its source imports (name, relative
    level), or None when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    sha = hashlib.sha256(data).hexdigest()
    if sha not in _IMPORTS:
        imports: list[tuple[str, int]] = []
        with contextlib.suppress(SyntaxError, ValueError, UnicodeDecodeError):
            for node in ast.walk(ast.parse(data)):
                if isinstance(node, ast.Import):
                    imports += [(alias.name, 0) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    imports.append((base, node.level))
                    imports += [(f"{base}.{a.name}" if base else a.name, node.level) for a in node.names]
        _IMPORTS[sha] = tuple(imports)
    return sha, _IMPORTS[sha]


def _imported(module: types.ModuleType, name: str, level: int) -> types.ModuleType | None:
    """The loaded module an import statement of ``module`` names (relative imports resolved)."""
    if level:
        package = module.__package__ or ""
        parts = package.split(".") if package else []
        if level - 1 > len(parts):
            return None
        base = ".".join(parts[: len(parts) - (level - 1)])
        name = f"{base}.{name}" if name else base
    return sys.modules.get(name)


def _simple_globals(module: types.ModuleType) -> str:
    """The module's plain-valued globals (numbers, strings, tuples of them): a constant changed at
    run time (``helpers.SCALE = 2``) changes the fingerprint, not only one edited in the file."""
    out = []
    for name, value in sorted(vars(module).items()):
        if name.startswith("__"):
            continue
        if isinstance(value, (bool, int, float, complex, str, bytes, type(None))) or (
            isinstance(value, (tuple, frozenset)) and len(value) <= 64
        ):
            out.append(f"{name}={_stable_repr(value)[:1000]}")
        elif isinstance(value, (Tensor, np.ndarray)):
            out.append(f"{name}={hash_tensors(value)}")
    return "\n".join(out)


def reachable_user_modules(start: str) -> dict[str, str]:
    """``{module name: file}`` of the user's own modules reachable from module ``start`` (itself
    included, if it is one): the modules it imports, or whose functions and classes it holds,
    followed transitively, outside the standard library, installed packages, torch and influencer.
    A file of ``""`` is a module whose code cannot be read."""
    first = sys.modules.get(start)
    out: dict[str, str] = {}
    todo = [first] if first is not None else []
    seen: set[str] = set()
    while todo and len(seen) < _MAX_MODULES:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        file = _user_file(module)
        if file is None:
            continue
        out[module.__name__] = file
        linked = []
        for value in list(vars(module).values()):
            if isinstance(value, types.ModuleType):
                linked.append(value)
            elif isinstance(value, (type, types.FunctionType)):
                linked.append(sys.modules.get(getattr(value, "__module__", None) or ""))
        facts = _file_facts(file) if file else None
        for name, level in facts[1] if facts else ():
            linked.append(_imported(module, name, level))
        todo += [m for m in linked if isinstance(m, types.ModuleType) and m.__name__ not in seen]
    return out


def user_code_digest(start: str) -> str | None:
    """sha256 over every module of the user's own code reachable from module ``start`` (see
    :func:`reachable_user_modules`): each file's bytes as on disk, its code as loaded and its
    plain-valued globals. None when one of them cannot be read, so that a cache keyed by it is
    never reused (an edit there could not be seen)."""
    h = hashlib.sha256()
    for name, file in sorted(reachable_user_modules(start).items()):
        facts = _file_facts(file) if file else None
        if facts is None:
            return None
        module = sys.modules[name]
        h.update(f"{name}\n{facts[0]}\n{loaded_code_digest(module)}\n{_simple_globals(module)}\n".encode())
    return h.hexdigest()


_SKIPPED_PACKAGES = ("builtins", "torch", "abc", "typing")


def _classes(obj: Any, known: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """``{qualified name: source digest}`` of ``type(obj)`` and its bases outside torch and builtins
    (those in ``known`` are taken from it: a model holds many instances of a few classes)."""
    out = {}
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] in _SKIPPED_PACKAGES:
            continue
        name = f"{cls.__module__}.{cls.__qualname__}"
        out[name] = known[name] if known is not None and name in known else source_digest(cls)
    return out


def model_fingerprint(model: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Any]:
    """What defines a model's function: every module's class (and its source) and the state used.

    ``state`` maps names to the tensors the computation uses (parameters and buffers), so their
    names, dtypes, shapes and values all count. A ``None`` source digest means the class's code
    could not be read, so a change to it would go unnoticed: callers that cache results must not
    reuse them then (see :func:`unverifiable`).
    """
    classes: dict[str, str | None] = {}
    for module in model.modules():
        classes.update(_classes(module, classes))
    return {"classes": classes, "state": hash_tensors(state)}


# Stands for a value that has no reproducible fingerprint (see _value_fingerprint).
UNVERIFIABLE = "<no reproducible fingerprint>"


def _value_fingerprint(value: Any) -> Any:
    """A JSON-able, reproducible stand-in for an attribute's value; :data:`UNVERIFIABLE` when there
    is none.

    Tensors and arrays are hashed, plain values kept, containers fingerprinted item by item,
    modules by class source and state, functions by their source; an object whose ``repr`` is
    the default one (an address, different in every process) cannot be told apart from a changed
    one, so it gets None.
    """
    if isinstance(value, (Tensor, np.ndarray)):
        return hash_tensors(value)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_value_fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _value_fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.nn.Module):
        fingerprint = model_fingerprint(value, dict(value.state_dict()))
        return UNVERIFIABLE if None in fingerprint["classes"].values() else fingerprint
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if inspect.isfunction(value) or inspect.ismethod(value):
        function = getattr(value, "__func__", value)
        try:
            own = inspect.getsource(function)
        except (OSError, TypeError):
            return None
        module = _module_source(function.__module__)
        reached = user_code_digest(function.__module__)
        if module is None or reached is None:
            return None
        return (
            f"function {function.__module__}.{function.__qualname__}:"
            + hashlib.sha256(f"{own}\n{module}\n{reached}".encode()).hexdigest()
        )
    text = repr(value)
    if " at 0x" in text:  # the default repr: an address, not the value
        return UNVERIFIABLE
    return f"{type(value).__qualname__}:{text}"


def task_fingerprint(task: Task) -> dict[str, Any]:
    """The task's own :meth:`~influencer.tasks.Task.settings`, its class source and its attributes.

    Attributes are included so that a hyperparameter held on the task changes the fingerprint even
    when ``settings()`` is not overridden (see :func:`_value_fingerprint`).
    """
    attributes = {name: _value_fingerprint(value) for name, value in sorted(vars(task).items())}
    return {"settings": task.settings(), "classes": _classes(task), "attributes": attributes}


def unverifiable(gradients: dict[str, Any]) -> list[str]:
    """What in ``Influence.settings()["gradients"]`` cannot be fingerprinted: classes whose source
    cannot be read and task attributes without a reproducible value (by name)."""
    out = [name for name, digest in gradients["model"]["classes"].items() if digest is None]
    task = gradients["task"]
    out += [name for name, digest in task.get("classes", {}).items() if digest is None]
    attributes = task.get("attributes", {}).items()
    out += [f"task attribute {name!r}" for name, value in attributes if _holds_unverifiable(value)]
    return out


def _holds_unverifiable(value: Any) -> bool:
    if isinstance(value, list):
        return any(_holds_unverifiable(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_unverifiable(v) for v in value.values())
    return value == UNVERIFIABLE
