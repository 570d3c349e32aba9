"""The package's shape: no import cycle (every import counted, function-local ones too), and
command-line modules are not imported by the library."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "dit_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, known: set) -> set:
    """The dit_jax modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def module_paths() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict:
    """module -> the dit_jax modules it imports (packages' empty __init__ files are no edges)."""
    paths = module_paths()
    modules = {name for name, path in paths.items() if path.name != "__init__.py"}
    return {name: imported_modules(paths[name], modules) - {name} for name in modules}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "dit_jax.sampling" in graph and "dit_jax.train" in graph["dit_jax.main"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_command_lines_are_not_imported_by_the_library():
    """A module that defines flags is a command line; nothing in the package imports it."""
    graph, paths = import_graph(), module_paths()
    clis = {name for name in graph if "flags.DEFINE" in paths[name].read_text()}
    assert {"dit_jax.main", "dit_jax.sample", "dit_jax.score_digits"} <= clis
    users = {(user, cli) for user, deps in graph.items() for cli in deps & clis}
    assert not users, users
    # nor do the tests, which run them as programs (their flags are defined on import)
    tests = {p.name: imported_modules(p, clis) for p in (REPO / "tests").glob("*.py")}
    assert not {name: deps for name, deps in tests.items() if deps}
