"""The house: runtime/ serves only (the bench harness lives in bench/ and nothing in runtime/
imports it), and no two trtforge modules import each other, directly or around a circle (every
import counts: top-level, lazy inside functions, and TYPE_CHECKING ones)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trtforge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trtforge":
                for alias in node.names:  # `from trtforge.bench import workloads` imports a module
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "trtforge"}
        # a package's __init__ is imported with any of its modules: not a dependency of its own
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_runtime_serves_only():
    graph = import_graph()
    offenders = [(m, d) for m, deps in graph.items() if m.startswith("trtforge.runtime")
                 for d in deps if d.startswith("trtforge.bench")]
    assert not offenders, offenders
    assert {"trtforge.bench.harness", "trtforge.bench.baselines", "trtforge.bench.workloads",
            "trtforge.bench.callers"} <= set(graph)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)
