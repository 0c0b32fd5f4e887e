"""The package's layout stays true: layers import only downwards, no circles, no private names across modules.

The layers, lowest first, are listed in docs/architecture.md; this test reads
every import of ``src/pytest_mnn_parity`` with ``ast`` (imports inside functions
included: a lazy import is still a dependency), so a change that breaks the
layout fails here with the offending file and line.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "pytest_mnn_parity"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"

# Lowest first.  A module may import its own layer and the layers before it.
LAYERS = ["core", "mnn", "inputs", "trace", "onnx", "engine", "regression", "report", "isolation", "plugin"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """Every node, leaving out ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import of the package in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if (SRC.parent / Path(*submodule.split("."))).with_suffix(".py").exists() or \
                        (SRC.parent / Path(*submodule.split(".")) / "__init__.py").exists():
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, str, int]]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_sits_in_a_layer():
    strays = [m for m in graph() if m != PACKAGE and layer_of(m) not in LAYERS]
    assert not strays, f"modules outside the layer subpackages {LAYERS}: {strays}"


def test_layers_import_only_downwards():
    wrong = []
    for module, imported in graph().items():
        mine = layer_of(module)
        if mine is None:
            continue  # the package root is the public API: it may re-export any layer
        for target, _, line in imported:
            theirs = layer_of(target)
            if theirs is None:
                wrong.append(f"{module}:{line} imports the package root {target} (import from the layer itself)")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module}:{line} ({mine}) imports {target} ({theirs}), a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    edges = {m: {t for t, _, _ in imported if t != m} for m, imported in graph().items()}
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_private_names_across_modules():
    wrong = [f"{module}:{line} imports {name} from {target}"
             for module, imported in graph().items() for target, name, line in imported
             if name.startswith("_") and not name.startswith("__") and target != module]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules above are not vacuous: a planted upward import and a private import are found."""
    root = tmp_path / PACKAGE
    (root / "core").mkdir(parents=True)
    (root / "plugin").mkdir()
    for init in (root / "__init__.py", root / "core" / "__init__.py", root / "plugin" / "__init__.py"):
        init.write_text("")
    (root / "plugin" / "hooks.py").write_text("def _secret():\n    pass\n")
    (root / "core" / "bad.py").write_text("def f():\n    from ..plugin.hooks import _secret\n")
    monkeypatch.setattr(__import__(__name__), "SRC", root)
    with pytest.raises(AssertionError, match="higher layer"):
        test_layers_import_only_downwards()
    with pytest.raises(AssertionError, match="imports _secret"):
        test_no_private_names_across_modules()


def test_architecture_doc_lists_every_layer_in_order():
    text = DOC.read_text()
    found = re.findall(r"^\| `(\w+)/` \|", text, flags=re.M)
    assert found == LAYERS, f"docs/architecture.md's layer table {found} differs from the enforced order {LAYERS}"
