"""The architecture as the import graph shows it: data flows one way, and the uploader and the evaluator
share only `db` and `common` (so the uploader image installs without `evaluator/`)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "db", "uploader", "evaluator", "mmdet_wandb")
#: What each top-level package may import from the others (the CLI wires everything together).
ALLOWED = {
    "common": set(),
    "db": {"common"},
    "uploader": {"common", "db"},
    "evaluator": {"common", "db"},
    "mmdet_wandb": {"common", "db", "uploader", "evaluator"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES)
    return found


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = REPO) -> set[str]:
    """Modules of ours that a module imports, at the top or inside a function (`from a import b` names a.b when
    that is a module, else a; a relative import is resolved from the module's package)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {name for name in found if name in modules}


def module_graph() -> dict[str, set[str]]:
    """module → the modules of ours it imports (not counting itself)."""
    paths = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py")) if "migrations" not in p.parts}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package → imported package → the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            for target in imported_packages(path) - {package}:
                graph[package].setdefault(target, []).append(str(path.relative_to(REPO)))
    return graph


def test_uploader_and_evaluator_never_import_each_other() -> None:
    graph = package_graph()
    assert "evaluator" not in graph["uploader"], graph["uploader"].get("evaluator")
    assert "uploader" not in graph["evaluator"], graph["evaluator"].get("uploader")


def test_packages_import_only_downstream_and_form_no_cycle() -> None:
    graph = package_graph()
    for package, targets in graph.items():
        extra = set(targets) - ALLOWED[package]
        assert not extra, f"{package} imports {sorted(extra)}: {[targets[t] for t in sorted(extra)]}"
    order: list[str] = []
    remaining = {p: set(t) for p, t in graph.items()}
    while remaining:
        ready = sorted(p for p, deps in remaining.items() if not deps - set(order))
        assert ready, f"import cycle among {sorted(remaining)}"
        order.extend(ready)
        for p in ready:
            del remaining[p]


def test_the_graph_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from evaluator.worker import Worker\n    import uploader.loop\n")
    assert imported_packages(module) == {"evaluator", "uploader"}


def test_no_module_imports_itself_back_through_others_even_lazily() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_check_sees_a_lazy_import_back_inside_a_package(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loop.py").write_text("from pkg.shards import backlog\n")
    (package / "shards.py").write_text("def run():\n    from . import loop\n")
    (package / "other.py").write_text("from pkg import loop\n")
    modules = {"pkg", "pkg.loop", "pkg.shards", "pkg.other"}
    graph = {f"pkg.{p.stem}": imported_modules(p, modules, tmp_path) for p in package.glob("[!_]*.py")}
    assert graph == {"pkg.loop": {"pkg.shards"}, "pkg.shards": {"pkg.loop"}, "pkg.other": {"pkg.loop"}}
    assert cycles(graph) == [["pkg.loop", "pkg.shards"]]


def test_the_cli_runs_where_the_evaluator_is_not_installed() -> None:
    """The uploader image has no `evaluator/`: every CLI module imports, and `--help` runs, with it unimportable."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'evaluator' or name.startswith('evaluator.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, mmdet_wandb\n"
        "for m in pkgutil.iter_modules(mmdet_wandb.__path__):\n"
        "    importlib.import_module('mmdet_wandb.' + m.name)\n"
        "from mmdet_wandb.cli import main\n"
        "sys.argv = ['mmdet-wandb', 'watch', '--help']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
