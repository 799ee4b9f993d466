"""The house rules of msrnn/, read from the source with ast (no module is imported): every module at most 450 lines
(docstrings count), no module imports another's private (underscore) name, no circle of imports among msrnn's
modules (imports inside functions count too), every module named in README's Layout section, and the tests that
attention.py's table names exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "msrnn"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported msrnn module, name taken from it or None for the module itself, line) for every import in module
    `name`, at any depth (an import inside a function is still a dependency)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # `from . import quant`: the module itself
                    found.append((f"{target}.{alias.name}", None, node.lineno))
                elif target in MODULES:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name in MODULES]
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name) if target != name} for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_at_most_450_lines(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it by concept"


def test_no_module_imports_another_modules_private_name():
    private = [f"{MODULES[name].relative_to(ROOT)}:{line} takes {taken} from {target}"
               for name in MODULES for target, taken, line in imports(name)
               if target != name and taken is not None and taken.startswith("_") and not taken.startswith("__")]
    assert not private, "make the name public where it lives, or move it: " + "; ".join(private)


def test_no_circle_of_imports():
    assert not cycles(graph()), f"circles of imports: {cycles(graph())}"


def test_the_checker_finds_circles_and_private_names():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert ("msrnn.policies", "Policy") in {(t, n) for t, n, _ in imports("msrnn.model")}  # `from .policies import`
    assert any(t == "msrnn.quant" and n is None for t, n, _ in imports("msrnn.weights"))  # `from . import quant`


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.find("\n## ", 1) if "\n## " in layout[1:] else len(layout)]
    missing = []
    for name, path in MODULES.items():
        relative = path.relative_to(ROOT)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if len(relative.parts) == 2:  # msrnn/x.py
            named = f"`{relative.as_posix()}`" in layout
        else:  # msrnn/pkg/x.py: the package's row names its files
            named = f"`{relative.parent.as_posix()}/`" in layout and f"`{path.name}`" in layout
        if not named:
            missing.append(relative.as_posix())
    assert not missing, f"README's Layout section does not name {missing}"


def test_the_attention_table_names_tests_that_exist():
    doc = ast.get_docstring(ast.parse((PACKAGE / "attention.py").read_text(encoding="utf-8")))
    references = re.findall(r"(tests/\w+\.py)::(\w+)", doc)
    assert len(references) >= 7  # one at least for each path
    for file, test in references:
        tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
        assert test in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{file}::{test} does not exist"
