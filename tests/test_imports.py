"""The house's import rules, read from the source: the modules of jaxlstm import one another without a
cycle, at the top of the module (no import deferred into a function to dodge one), name no private
(``_``-prefixed) function of another module, and ``jaxlstm.tuning`` is a leaf."""

import ast
import glob
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), os.pardir, "jaxlstm")


def _is_main_guard(node) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _imports(path: str):
    """(imported module, names, inside a function) for every import of a jaxlstm module in ``path``,
    leaving out the ``if __name__ == "__main__":`` block (it runs as a script, after the package)."""
    me = os.path.splitext(os.path.basename(path))[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 or (child.module or "").startswith("jaxlstm"):
                    module = (child.module or "").removeprefix("jaxlstm").lstrip(".")
                    if module:
                        out.append((module.split(".")[0], [a.name for a in child.names], inner))
                    else:  # from . import a, b
                        out.extend((a.name, [], inner) for a in child.names)
            elif isinstance(child, ast.Import):
                out.extend((a.name.split(".")[1], [], inner) for a in child.names if a.name.startswith("jaxlstm."))
            visit(child, inner)

    with open(path, encoding="utf-8") as f:
        visit(ast.parse(f.read()), False)
    return me, out


def _graph():
    mods = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))):
        me, imports = _imports(path)
        mods[me] = imports
    return mods


def test_no_import_cycle():
    mods = _graph()
    edges = {m: {t for t, _, _ in imps if t in mods and t != m} for m, imps in mods.items()}
    state: dict[str, int] = {}

    def walk(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(t) :], t]))
            if t not in state:
                walk(t, [*path, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    assert len(edges) > 10  # the walk saw the package


def test_no_deferred_imports_and_no_private_names_across_modules():
    for me, imports in _graph().items():
        for module, names, in_function in imports:
            assert not in_function, f"jaxlstm/{me}.py imports {module} inside a function"
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"jaxlstm/{me}.py imports private names {private} from {module}"


def test_tuning_is_a_leaf():
    assert _graph()["tuning"] == []
