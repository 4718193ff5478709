"""The tree's shape: no import cycle across ``dovetail/`` and ``bench/`` (imports inside functions count
too: a lazy import hides a cycle, it does not remove it), the library never imports the benchmarks,
and no module grows past ``MAX_LINES`` (past that, a module holds more than one role)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dovetail", "bench")  # the library and the benchmarks, which import it
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``PACKAGES`` it imports (a name imported from a module counts as that module)."""
    def owner(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] in PACKAGES}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in PACKAGES:
                    deps |= {owner(f"{node.module}.{a.name}") or owner(node.module) or node.module for a in node.names}
        graph[name] = deps - {name, ""}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_across_the_library_and_the_benchmarks():
    graph = _imports(_modules())
    assert {name.split(".")[0] for name in graph} == set(PACKAGES) and len(graph) > 40  # the walk saw both
    assert any(dep.startswith("dovetail") for dep in graph["bench.common"])  # ... and their imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_benchmarks():
    graph = _imports(_modules())
    assert not {name: deps for name, deps in graph.items()
                if name.split(".")[0] == "dovetail" and any(d.split(".")[0] == "bench" for d in deps)}


def test_no_module_is_over_the_line_limit():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in _modules().values()}
    over = sorted((lines, name) for name, lines in sizes.items() if lines > MAX_LINES)
    assert not over, f"over {MAX_LINES} lines: " + ", ".join(f"{name} ({lines})" for lines, name in reversed(over))
