"""The package's layering, checked on the source: no import cycles (not even inside functions), and no
module importing from a layer above its own. See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "dsv3"

# Bottom to top; a module may import its own layer's package and anything below.
LAYERS = [
    {"config", "io", "checkpoints", "compiling", "host_copy"},
    {"model", "data", "scaling"},
    {"parallel"},
    {"infer"},
    {"train"},
    {"eval"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every dsv3 module and the dsv3 modules it imports, wherever the import statement stands."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("dsv3")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                if base.startswith("dsv3"):
                    found.add(base.rstrip("."))
        graph[name] = found - {name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_every_subpackage_has_a_layer():
    graph = _imports()
    tops = {m.split(".")[1] for m in graph if "." in m} - {"__main__"}
    assert {t for t in tops if _layer(f"dsv3.{t}") is None} == set()


def test_no_module_imports_from_a_higher_layer():
    wrong = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _imports().items()
        for target in targets
        if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module)
    ]
    assert wrong == []


def test_no_import_cycles():
    graph = _imports()
    # dsv3.x.y imports resolve to the module, or to the package when y is a name inside it
    resolve = {
        m: {t if t in graph else t.rpartition(".")[0] for t in ts} & set(graph) for m, ts in graph.items()
    }
    # Packages re-exporting their modules (`dsv3.model` → `dsv3.model.transformer`) are not cycles.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in resolve.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []
