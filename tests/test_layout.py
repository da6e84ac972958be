"""The layers of the tree, read from its import statements: imports run one way between packages,
no module imports itself through others, and the model and the infrastructure know nothing of pytest."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import; a package below another never imports it.
ALLOWED = {
    "runtime": set(),
    "detr": {"runtime"},
    "parity": {"runtime"},
    "training": {"detr", "runtime"},
    "markers": {"detr", "parity", "training", "runtime"},
    "fixtures": {"markers", "detr", "parity", "training", "runtime"},
    "suite": {"fixtures", "markers", "detr", "parity", "training", "runtime"},
}
# ``python -m detr.train``, kept for one release: it only starts training.train.
SHIMS = {"detr/train.py"}
NO_PYTEST = ("runtime", "detr", "parity", "training")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, package: str = "") -> Set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, at any depth, resolved to
    absolute names (``from . import x`` included; ``package`` is the file's, by default from its path)."""
    if not package:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_modules() -> Dict[str, Path]:
    return {module_name(p): p for package in ALLOWED for p in (ROOT / package).rglob("*.py")}


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for name, path in project_modules().items():
        if str(path.relative_to(ROOT)) in SHIMS:
            continue
        package = name.split(".")[0]
        for other in {n.split(".")[0] for n in imported(path)} & set(ALLOWED):
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert wrong == []


@pytest.mark.parametrize("package", NO_PYTEST)
def test_the_model_and_the_infrastructure_import_no_pytest(package):
    users = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
             if {n.split(".")[0] for n in imported(p)} & {"pytest", "_pytest", "pytest_benchmark"}]
    assert users == []


def cycles(graph: Dict[str, Set[str]]) -> List[str]:
    """Each import cycle of a module graph, as ``a -> b -> a``; an edge from a package's __init__ into
    its own modules (a re-export) is no cycle."""
    done, found = set(), []

    def visit(name, stack):
        if name in stack:
            found.append(" -> ".join(stack[stack.index(name):] + [name]))
            return
        if name in done:
            return
        for other in sorted(graph[name]):
            if not other.startswith(name + "."):
                visit(other, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_no_module_imports_itself_through_others():
    modules = project_modules()
    graph = {name: {n for n in imported(path) if n in modules and n != name} for name, path in modules.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.x"}, "p.x": set()}) == ["a -> b -> c -> a"]


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from detr import build\n    import markers.state\n    from .misc import x\n")
    assert {"detr", "detr.build", "markers.state", "parity.misc", "parity.misc.x"} <= imported(bad, "parity")


def package_edges(root: Path = ROOT) -> Dict[str, Dict[str, int]]:
    """package -> {package it imports: how many of its files do}, for the tree at ``root``."""
    edges: Dict[str, Dict[str, int]] = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            for other in sorted({n.split(".")[0] for n in imported(path, "x")} & set(ALLOWED) - {package}):
                edges.setdefault(package, {}).setdefault(other, 0)
                edges[package][other] += 1
    return edges


if __name__ == "__main__":
    # python tests/test_layout.py [ROOT]: the import graph between packages, with file counts.
    import sys

    for package, others in package_edges(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT).items():
        print(f"{package} -> " + ", ".join(f"{o} ({n})" for o, n in sorted(others.items())))
