"""The package's floors: imports only go down, never round in a cycle; plotting and CLI stay on top.

Floors (low to high): the private engine ``_kernel`` (0); estimators, samplers, tasks, data,
datasets, layers, errors (1); influence, heads, retraining (and its cache), ensemble, training,
models, testing, index (2); uses and its alias validation (3); plotting (4); app (5). The paper's
reproductions live outside the package (``reproductions/``) and the package never imports them.
The package ``__init__`` is the public face over the library floors: its own imports are not
checked, and only the app may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "src" / "influencer"
PACKAGE = "influencer"

FLOORS = {
    "_kernel": 0,
    "estimators": 1,
    "samplers": 1,
    "tasks": 1,
    "data": 1,
    "datasets": 1,
    "layers": 1,
    "errors": 1,
    # public faces of the engine's helpers (files, fingerprints, scores, ...) for the app and users
    "extras": 1,
    "files": 1,
    "fingerprint": 1,
    "functional": 1,
    "progress": 1,
    "scores": 1,
    "stats": 1,
    "influence": 2,
    "unrolled": 2,
    "heads": 2,
    "retraining": 2,
    "retraining_cache": 2,
    "ensemble": 2,
    "training": 2,
    "models": 2,
    "testing": 2,
    "index": 2,
    "uses": 3,
    "validation": 3,
    "plotting": 4,
    "app": 5,
}
PUBLIC_FACE = PACKAGE  # influencer/__init__.py

# Known upward imports still to be moved. Entries are (importing module, imported module); the
# list may only shrink (the test fails on an entry that is no longer needed).
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # (module, imported module) exceptions: none


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = modules()


def floor(module: str) -> int | None:
    """The floor of a module inside the package; ``None`` for the public face."""
    if module == PUBLIC_FACE:
        return None
    top = module.split(".")[1]
    if top not in FLOORS:
        raise AssertionError(f"{module} is on no floor: add {top!r} to FLOORS in tests/test_layers.py")
    return FLOORS[top]


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def private_names(module: str, path: Path | None = None) -> list[tuple[str, str]]:
    """``(imported module, name)`` for each private name (leading underscore, not a dunder and not
    a module) that ``module`` (read from ``path``, by default its own file) imports from another
    module of the package."""
    path = path or MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = resolve(module, path, node)
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        for alias in node.names:
            name = alias.name
            dunder = name.startswith("__") and name.endswith("__")
            if name.startswith("_") and not dunder and f"{target}.{name}" not in MODULES:
                found.append((target, name))
    return found


def is_private_module(module: str) -> bool:
    return any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:])


def imports(module: str) -> set[str]:
    """Every module ``module`` imports (also inside functions): package modules by their names,
    others by their top-level name. ``from pkg import sub`` counts as importing ``pkg.sub``.
    Imports under ``if TYPE_CHECKING:`` are annotations only, never run, and do not count."""
    path = MODULES[module]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name if alias.name.startswith(PACKAGE + ".") else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node)
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                out.add(target.split(".")[0])
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    out.discard(module)
    return out


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for m in MODULES:
        deps = set()
        for target in imports(m):
            if target in MODULES:
                deps.add(target)
            elif target.startswith(PACKAGE + "."):
                raise AssertionError(f"{m} imports {target}, which is not a module of the package")
        graph[m] = deps
    return graph


GRAPH = internal_graph()


def test_every_module_is_on_a_floor() -> None:
    assert len(MODULES) > 40
    for m in MODULES:
        floor(m)


def test_imports_only_go_down() -> None:
    upward = set()
    for m, deps in GRAPH.items():
        if m == PUBLIC_FACE:
            continue
        for d in deps:
            if d == PUBLIC_FACE:
                if floor(m) < FLOORS["app"]:
                    upward.add((m, d))  # the public face imports the library floors
            elif floor(d) > floor(m):
                upward.add((m, d))
    new = sorted(upward - ALLOWED_UPWARD)
    assert not new, "imports from a higher floor:\n" + "\n".join(f"  {a} -> {b}" for a, b in new)
    fixed = sorted(ALLOWED_UPWARD - upward)
    assert not fixed, "no longer needed in ALLOWED_UPWARD (remove them):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in fixed
    )


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    cycles = strongly_connected(GRAPH)
    assert not cycles, "modules importing each other (directly or round a loop):\n" + "\n".join(
        "  " + ", ".join(c) for c in cycles
    )


def test_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_package_never_imports_the_reproductions() -> None:
    # reproductions/ is not installed: an import of it works in a checkout and fails for users.
    found = sorted(m for m in MODULES if "reproductions" in imports(m))
    assert not found, f"modules importing reproductions (not part of the package): {found}"


def in_app(module: str) -> bool:
    return module == f"{PACKAGE}.app" or module.startswith(f"{PACKAGE}.app.")


def test_no_private_name_is_imported_across_modules() -> None:
    found = sorted(
        f"  {m} imports {name} from {target}"
        for m in MODULES
        if not in_app(m)
        for target, name in private_names(m)
    )
    assert not found, "private names imported from another module (make them public there):\n" + "\n".join(
        found
    )


def test_private_name_finder_sees_relative_and_aliased_imports(tmp_path: Path) -> None:
    path = tmp_path / "kfac.py"
    path.write_text(
        "from .kronecker import _hidden as shown, public\n"
        "from influencer import _kernel\n"
        "from influencer._kernel.task import __all__\n"
        "from torch import _C\n"
    )
    found = private_names(f"{PACKAGE}.estimators.kfac", path)
    assert found == [(f"{PACKAGE}.estimators.kronecker", "_hidden")]


def test_app_imports_only_public_library_modules() -> None:
    private = sorted(
        f"  {m} -> {d}"
        for m in MODULES
        if in_app(m)
        for d in GRAPH[m]
        if not in_app(d) and is_private_module(d)
    )
    names = sorted(
        f"  {m} imports {name} from {target}"
        for m in MODULES
        if in_app(m)
        for target, name in private_names(m)
    )
    assert not private and not names, "the app reaches past the public library:\n" + "\n".join(
        private + names
    )


@pytest.mark.parametrize(
    ("library", "home"), [("matplotlib", "influencer.plotting"), ("click", "influencer.app")]
)
def test_library_only_in_its_floor(library: str, home: str) -> None:
    outside = sorted(
        m for m in MODULES if library in imports(m) and not (m == home or m.startswith(home + "."))
    )
    assert not outside, f"{library} is imported outside {home}: {outside}"


def test_public_face_is_small_and_every_subpackage_exports_what_it_lists():
    import importlib

    import influencer

    assert set(influencer.__all__) == {
        "Influence", "Task", "ClassificationTask", "RegressionTask", "SmoothHingeTask",
        "CG", "BlockCG", "LiSSA", "Arnoldi", "Exact", "ExactOrCG", "KFAC", "EKFAC", "Identity",
        "top_k", "TopK", "InfluencerError", "choose_estimator", "Choice", "Unrolled",
    }  # fmt: skip
    for name in ("tasks", "data", "errors", "estimators", "samplers", "uses", "models", "testing"):
        module = importlib.import_module(f"influencer.{name}")
        missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
        assert not missing, f"influencer.{name} lists {missing} but does not define them"


def test_app_modules_are_small() -> None:
    """Each module of the app does one thing: none grows past about 400 lines."""
    big = sorted(
        f"  {m}: {n} lines"
        for m, path in MODULES.items()
        if in_app(m) and (n := len(path.read_text().splitlines())) > 400
    )
    assert not big, "split these app modules by what they do:\n" + "\n".join(big)
