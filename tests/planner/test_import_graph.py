"""The planner's modules import one another without a circle (lazy imports inside functions
included): each can be read, tested and reused on its own."""
import ast
import pathlib

import distserve.planner

ROOT = pathlib.Path(distserve.planner.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _planner_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distserve.planner"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("distserve.planner"))
    return found


def test_no_import_circles_in_the_planner():
    graph = {_module_name(p): _planner_imports(p) for p in ROOT.rglob("*.py")}
    assert "distserve.planner.simulator.colocated" in graph
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if state.get(mod) == 2 or mod not in graph:
            return
        state[mod] = 1
        for dep in sorted(graph[mod]):
            visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])
