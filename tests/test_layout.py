"""The architecture as the import graph shows it: data flows one way, and the uploader and the evaluator
share only `db` and `common` (so the uploader image installs without `evaluator/`)."""
from __future__ import annotations

import ast
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
