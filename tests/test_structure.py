"""The package's module graph: each rule defined once, modules importing each other as a DAG.

Read from the source with ``ast``: no module imports a private name of a sibling (``_name``) or
uses one through a module attribute (``_rows._helper``), no jaxce import hides inside a function
(a lazy import is how a cycle is usually papered over), and the graph of imports is acyclic.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxce"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _tree(name):
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _jaxce_module(node) -> list[str]:
    """The jaxce modules an import statement names (``from jaxce import _a, _b`` names two)."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "jaxce":
            return [a.name for a in node.names if a.name in MODULES]
        if node.module.startswith("jaxce."):
            return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("jaxce.")]
    return []


def _imports(name) -> set[str]:
    return {m for node in ast.walk(_tree(name)) for m in _jaxce_module(node)}


def test_the_package_has_the_expected_modules():
    assert {"_rows", "_blocks", "_xla", "_labels", "_cross_entropy", "_linear", "_sharding"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", list(MODULES))
def test_no_private_name_of_a_sibling_is_imported_or_used(name):
    tree = _tree(name)
    imported_modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxce."):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{name} imports private {private} from {node.module}"
        if isinstance(node, ast.ImportFrom) and node.module == "jaxce":
            imported_modules |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported_modules
            and node.attr.startswith("_")
        ):
            raise AssertionError(f"{name} uses {node.value.id}.{node.attr}, a private name")


LIBRARY = [name for name in MODULES if name.startswith("_") and not name.startswith("__")]


@pytest.mark.parametrize("name", LIBRARY)
def test_no_lazy_import_of_a_jaxce_module(name):
    """In the library modules (the command-line tools may defer loading the demo)."""
    for fn in ast.walk(_tree(name)):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                assert not _jaxce_module(node), f"{name}.{fn.name} imports {_jaxce_module(node)}"


def test_imports_form_a_dag():
    graph = {name: _imports(name) - {name} for name in MODULES}
    state: dict[str, str] = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "active", "import cycle: " + " -> ".join(path + [node])
        state[node] = "active"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])


def test_the_losses_share_the_row_kernel():
    """The plain, fused and sharded cross-entropies import the kernel, not each other."""
    for name in ("_cross_entropy", "_linear", "_sharding", "_blocks"):
        assert "_rows" in _imports(name), name
    assert "_linear" not in _imports("_sharding")
    assert "_cross_entropy" not in _imports("_sharding") | _imports("_linear")
