"""``pipeline/``'s modules import each other without a cycle: each layer can be
read, tested and changed on its own (fine-tuning reads targets; distillation builds
targets and never calls back into the training loop)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "pipeline") -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of ``package`` it imports, at
    module level or inside functions (a deferred import is still a dependency)."""
    modules = {module_name(path): path for path in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pipeline.train import jobs` imports the module pipeline.train.jobs.
                imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {target for target in imported if target in modules and target != name
                       and not name.startswith(target + ".")}  # a package's own __init__ is no dependency
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_imports_form_no_cycle():
    graph = import_graph()
    assert "pipeline.train.classify" in graph and "pipeline.train.distill" in graph["pipeline.train.classify"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
