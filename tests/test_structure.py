"""The shape of the code base: imports run one way, files and functions stay readable.

Import rule: every ``import`` in the project's packages (probe, tasks, analysis, prefix_probe)
is an edge from its module to the project module it names, wherever the statement sits: at
module level or inside a function (a lazy import hides a circle, it does not remove it). The
edges must form a DAG. Three things are not edges: importing a module does not count as
importing its parent package's ``__init__`` (``from tasks import registry`` is an edge to
tasks.registry alone); imports under ``if TYPE_CHECKING:`` never run (annotations only); and
imports inside a module's ``__getattr__`` (PEP 562) are re-exports kept so that an old import
path still works, not dependencies.

Size rule: no file in probe/, tasks/ or analysis/ over 700 lines, no function there over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probe", "tasks", "analysis", "prefix_probe")
SIZED = ("probe", "tasks", "analysis")
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``), for every module in packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _project_module(name: str, modules) -> str | None:
    """The longest project module that `name` is, or lies in (an attribute of a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement in `module` reaches (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" for alias in node.names]


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module):
    """Every import statement of a module that runs: not in a module-level __getattr__, not in
    the body of ``if TYPE_CHECKING:``."""
    stack = [
        node
        for node in tree.body
        if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")
    ]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (see the module docstring for the rule)."""
    modules = _modules(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(node, name, is_package):
                found = _project_module(target, modules)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_project_imports_form_a_dag():
    graph = import_graph()
    assert "tasks.registry" in graph["tasks.sources"]  # the parse sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import circle: " + " -> ".join(cycle) + "; move what both need into a module that "
        "imports neither"
    )


def test_find_cycle_catches_a_circle_and_a_lazy_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # A function-level import closes a circle just as well; __getattr__ re-exports do not.
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from probe import two\n")
    (pkg / "two.py").write_text("def f():\n    from probe.one import x\n")
    (pkg / "three.py").write_text(
        "import probe.two\ndef __getattr__(name):\n    from probe import one\n"
    )
    (pkg / "four.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from probe import one\n"
        "else:\n    import probe.three\n"
    )
    graph = import_graph(tmp_path, ("probe",))
    assert graph["probe.one"] == {"probe.two"}
    assert graph["probe.two"] == {"probe.one"}
    assert graph["probe.three"] == {"probe.two"}
    assert graph["probe.four"] == {"probe.three"}
    assert find_cycle(graph) in (
        ["probe.one", "probe.two", "probe.one"],
        ["probe.two", "probe.one", "probe.two"],
    )


def _sized_files() -> list[Path]:
    return [path for package in SIZED for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("path", _sized_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_function_sizes(path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_FILE_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_FILE_LINES}); split it by concern"
    )
    long = [
        f"{node.name} (line {node.lineno}: {node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, (
        f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: "
        + ", ".join(long)
        + "; split them into named steps"
    )
