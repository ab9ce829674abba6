"""The package's shape: no import cycle, SQL only in the store, FAISS reached only through search and storage.

Read from the source (AST), so a regression fails here with the module named,
before it shows up as a tangle elsewhere.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "simsearch"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE FROM|CREATE TABLE|PRAGMA)\b")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _runtime_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """simsearch modules imported anywhere in `tree` (functions too), except under `if TYPE_CHECKING:`."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycle():
    trees = _modules()
    graph = {name: _runtime_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    # A package's __init__ importing its own children is not a cycle of the data's path.
    graph = {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_sql_lives_only_in_the_store():
    offenders = []
    for name, tree in _modules().items():
        if name == "simsearch.storage.store":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                offenders.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
            if isinstance(node, ast.Attribute) and node.attr in ("db", "conn"):
                offenders.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_faiss_is_reached_through_search_and_storage_only():
    """The views search through Searcher; none opens the FAISS module itself (maps' own kNN excepted)."""
    allowed = {"simsearch.storage.layout", "simsearch.retrieval.searcher", "simsearch.views.maps"}
    users = {name for name, tree in _modules().items()
             if "simsearch.storage.faiss_index" in _runtime_imports(tree, {"simsearch.storage.faiss_index"})}
    assert users <= allowed, users - allowed


def test_every_module_says_what_it_is_for():
    missing = [name for name, tree in _modules().items() if not ast.get_docstring(tree)]
    assert not missing, missing


# The layers, bottom up: a module may import from its own layer or any below it (README's module table).
LAYERS = [
    ("simsearch.errors", "simsearch.spec", "simsearch.records"),
    ("simsearch.pipeline.read", "simsearch.pipeline.decode", "simsearch.pipeline.backends",
     "simsearch.pipeline.openvino_cache", "simsearch.pipeline.shape_bins", "simsearch.pipeline.embed",
     "simsearch.pipeline.box_vectors", "simsearch.pipeline.edits",
     "simsearch.datasets"),
    ("simsearch.storage", "simsearch.pipeline.stored_maps"),
    ("simsearch.localizer",),
    ("simsearch.pipeline.build", "simsearch.pipeline"),
    ("simsearch.retrieval",),
    ("simsearch.views",),
    ("simsearch.cli",),
]


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and README's module table")


def test_each_layer_imports_only_from_itself_and_below():
    trees = _modules()
    upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
              for name, tree in trees.items() if name != "simsearch"  # the root re-exports lazily from the top
              for dep in _runtime_imports(tree, set(trees)) if dep != "simsearch" and _layer(dep) > _layer(name)]
    assert not upward, "\n".join(upward)
