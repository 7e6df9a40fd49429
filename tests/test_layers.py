"""The package's shape, read from its source with ``ast``: layers import only downwards, no
import cycles, short functions, a short loop, a small top level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xlm_jax"

# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = ("core", "text", "data", "model", "tasks", "tools")
TOP_LEVEL_LIMIT = 12  # entry points and thin re-exports
FUNCTION_LIMIT = 100  # lines, decorators and docstring included
LOOP_LIMIT = 150
TASK_SETUP_LIMIT = 120


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in its body (lazy imports count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "xlm_jax":
                out.add(target)
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) == 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)  # the top level: entry points


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(name, tree, known) for name, tree in trees.items()}


def test_layers_import_only_downwards(graph):
    upward = [
        f"{name} ({LAYERS[layer(name)] if layer(name) < len(LAYERS) else 'top'}) imports {dep}"
        for name, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer(dep) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_core_imports_no_task(graph):
    bad = [(n, d) for n, ds in graph.items() if n.startswith("xlm_jax.core") for d in ds]
    assert not [b for b in bad if not b[1].startswith("xlm_jax.core")], bad


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            yield node.name, node.end_lineno - start + 1


def test_functions_are_short():
    long = [
        f"{name}.{fn}: {n} lines"
        for name, tree in modules().items()
        for fn, n in functions(tree)
        if n > FUNCTION_LIMIT
    ]
    assert not long, "\n".join(long)


def length_of(module: str, function: str) -> int:
    found = dict(functions(modules()[module]))
    assert function in found, f"{module} has no {function}"
    return found[function]


def test_the_loop_and_task_setups_are_short():
    assert length_of("xlm_jax.core.loop", "run") <= LOOP_LIMIT
    for task in ("pretrain", "nmt", "xnli"):
        assert length_of(f"xlm_jax.tasks.{task}", "setup") <= TASK_SETUP_LIMIT, task


def test_top_level_is_small():
    # __init__.py marks the package; it is no entry point
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_LIMIT, top
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text(encoding="utf-8").count("\n")
        assert path.name == "main.py" or lines <= 12, f"{path.name} is not a thin entry point"
