"""The package layout: dependencies point one way between the sub-packages, and no module imports itself
back through a circle. Read from the source (``import`` statements, lazy ones included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minidiff"
# what each sub-package may import from the rest of minidiff ("files" and "checks" are the leaves of file and
# argument helpers)
ALLOWED = {
    "files": set(),
    "checks": set(),
    "models": {"files", "checks"},
    "schedulers": {"files", "checks"},
    "io": {"files", "checks", "models", "schedulers"},
    "sampling": {"files", "checks", "models", "schedulers"},
    "data": {"files", "checks"},
    "training": {"files", "checks", "models", "schedulers", "io", "sampling", "data", "text"},
    "kernels": {"files", "checks", "models"},
    "judge": {"files", "checks", "data", "sampling", "models", "schedulers"},
    "text": {"files", "checks", "models", "schedulers", "io"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The minidiff modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module or ""
            if target.startswith("minidiff"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names
                             if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).exists()
                             or (PACKAGE.parent / (f"{target}.{alias.name}".replace(".", "/") + ".py")).exists())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("minidiff"))
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.count(".") >= 1))
def test_dependencies_point_one_way(module):
    own = _subpackage(module)
    others = {_subpackage(m) for m in MODULES[module]} - {own, ""}
    assert others <= ALLOWED[own], f"{module} imports {sorted(others - ALLOWED[own])}, not allowed for {own}/"


def test_no_import_circles():
    graph = {m: {d for d in deps if d in MODULES and d != m} for m, deps in MODULES.items()}
    # a package's __init__ re-exporting its modules is not a circle; drop the edges into __init__ files
    packages = {m for m in MODULES if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    graph = {m: {d for d in deps if d not in packages or d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
