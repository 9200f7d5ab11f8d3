"""Imports inside btx_jax run one way: no module reaches itself through btx_jax imports, counting the ones
inside functions, and the layers config -> param_paths -> model -> checkpoint -> pretrained -> mix -> train -> eval
-> cli (the folders of btx_jax/, in import order; docs/design.md) never import a later layer.  Read from the
source (ast), so a lazy import cannot hide a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import btx_jax

PACKAGE = Path(btx_jax.__file__).parent
LAYERS = ("btx_jax.config", "btx_jax.param_paths", "btx_jax.model", "btx_jax.checkpoint", "btx_jax.pretrained",
          "btx_jax.mix", "btx_jax.train", "btx_jax.eval", "btx_jax.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: btx_jax modules it imports anywhere in its body}; `from pkg import name` counts as importing
    pkg.name when that is a module, else pkg."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("btx_jax"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("btx_jax"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_layers_import_one_way():
    backwards = [(m, d) for m, deps in import_graph().items() for d in deps
                 if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert not backwards, f"a layer imports a later one: {backwards}"


def test_the_checker_finds_a_circle():
    """The checker itself finds a circle."""
    graph = {"a": {"b"}, "b": set()}
    assert find_cycle(graph) is None
    graph["b"].add("a")
    assert find_cycle(graph) == ["a", "b", "a"]
