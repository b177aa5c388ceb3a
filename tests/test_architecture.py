"""The package's shape: no import cycle (lazy imports included), no module over 700 lines."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 700


def package_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """``module name -> (file, is a package __init__)`` for every module of the installed namespace.

    The namespace is pyproject's ``package-dir``: each package maps to a folder of the repository.
    """
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: root / folder for package, folder in tool["package-dir"].items()}
    modules: dict[str, tuple[Path, bool]] = {}
    for package in tool["packages"]:
        parent = next(p for p in sorted(folders, key=len, reverse=True) if package == p or package.startswith(p + "."))
        folder = folders[parent].joinpath(*package[len(parent):].split(".")[1:])
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = (path, path.stem == "__init__")
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at any depth (inside functions too), except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            yield from (n for child in node.orelse for n in _imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """``module -> the modules of the namespace it imports`` (``from pkg import name`` counts ``pkg.name``
    when that is a module, else ``pkg``)."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rsplit(".", 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
                candidates = [c for c in candidates[:-1] if c in modules] or [base]
            for candidate in candidates:
                while candidate not in modules and "." in candidate:
                    candidate = candidate.rsplit(".", 1)[0]
                if candidate in modules and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    assert "astrea_vlm.train.data" in modules and "astrea_vlm.modeling.towers" in modules
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, f"import cycle (lazy imports count): {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "pkg" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = {"pkg" = "pkg"}\npackages = ["pkg"]\n')
    graph = import_graph(package_modules(tmp_path))
    assert graph["pkg.c"] == set()  # type-only imports do not run
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_no_package_module_is_over_700_lines(name):
    path = package_modules()[name][0]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern (at most {MAX_LINES})"
