"""The package's import graph: its folders are its layers.

Every import of every module (at the top or inside a function) is read from
the source with `ast`, so the graph is the code's, not a hand-kept picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers first; a module may import its own subpackage and the layers
# below its own, never a layer beside or above it.
LAYERS = [
    {"tfgpt", "tfgpt.config", "tfgpt.console", "tfgpt.errors"},
    {"tfgpt.runtime"},
    {"tfgpt.model", "tfgpt.data"},
    {"tfgpt.serving"},
    {"tfgpt.train"},
    {"tfgpt.cli", "tfgpt.prepare", "tfgpt.export", "tfgpt.generate", "tfgpt.evaluate"},
]
MAX_LEVELS = 7  # modules on the longest chain of imports from tfgpt.cli down to a leaf


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(top: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / top).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tfgpt.data import text` names a module; `from tfgpt.data.text import X` names its module
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def package_graph() -> dict[str, set[str]]:
    mods = modules("tfgpt")
    graph = {m: imports_of(p, set(mods)) for m, p in mods.items()}
    for m, deps in graph.items():  # importing tfgpt.x.y runs tfgpt.x/__init__ first: not an arrow of the design
        deps -= {d for d in deps if m.startswith(d + ".") or d == "tfgpt"}
        deps.discard(m)
    return graph


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer or any(module.startswith(name + ".") for name in layer if name != "tfgpt"):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def group_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_the_graph_reader_sees_function_level_imports(tmp_path):
    """The reader is not fooled by an import hidden in a function."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tfgpt.data import text\n    import tfgpt.model.gpt\n")
    assert imports_of(f, {"tfgpt.data", "tfgpt.data.text", "tfgpt.model.gpt"}) == {
        "tfgpt.data",
        "tfgpt.data.text",
        "tfgpt.model.gpt",
    }


def test_no_import_cycles():
    graph = package_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d] if d in path else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_at_most_seven_levels_from_the_cli():
    graph = package_graph()
    memo: dict[str, list[str]] = {}

    def longest(m: str) -> list[str]:
        if m not in memo:
            memo[m] = [m] + max((longest(d) for d in graph[m]), key=len, default=[])
        return memo[m]

    chain = longest("tfgpt.cli")
    assert len(chain) <= MAX_LEVELS, " -> ".join(chain)


def test_subpackages_import_only_downward():
    bad = []
    for m, deps in package_graph().items():
        for d in deps:
            if group_of(d) == group_of(m):
                continue  # within a subpackage: ordered by the no-cycle test
            if layer_of(d) >= layer_of(m):
                bad.append(f"{m} -> {d}")
    assert not bad, "imports that do not go down a layer: " + ", ".join(sorted(bad))


def test_every_module_has_a_layer():
    for m in package_graph():
        layer_of(m)


def test_benchmarks_are_not_in_the_package():
    """The installed package neither holds nor imports the benchmarks."""
    assert not any(name.split(".")[-1].startswith("bench") for name in modules("tfgpt"))
    for m, path in modules("tfgpt").items():
        assert not imports_of(path, set(modules("benchmarks"))), f"{m} imports the benchmarks"
    assert (ROOT / "benchmarks" / "bench.py").exists()


def test_imports_inside_functions_say_why():
    """Imports go at the top of a module; one inside a function is there to
    keep TensorFlow's start-up out of the command line's checks, and says so
    in a comment on its line or the line above."""
    silent = []
    for m, path in modules("tfgpt").items():
        lines = path.read_text(encoding="utf-8").split("\n")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    near = " ".join(lines[max(0, inner.lineno - 3) : inner.lineno]).lower()
                    if "lazy" not in near and "not at the top" not in near:
                        silent.append(f"{m}:{inner.lineno}")
    assert not silent, "imports inside functions without a comment saying why: " + ", ".join(sorted(set(silent)))
