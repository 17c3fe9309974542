"""The package's imports point one way: no cycles among `hist_vlm` modules, and nothing outside
`hist_vlm.demo` and `hist_vlm.cli` imports the demo (the library finds it as a plugin).

The graph is read from the source with `ast`: every `import` / `from ... import` anywhere in a
module (inside functions too: a lazy import is still a dependency), except those under
`if TYPE_CHECKING:`, which never run. `from pkg import name` counts as importing `pkg.name`
when that is a module, else `pkg`.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ALLOWED_TO_IMPORT_DEMO = ("hist_vlm.demo", "hist_vlm.cli")


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the `hist_vlm` modules it imports."""
    files = {module_name(p, src): p for p in (src / "hist_vlm").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_only_the_demo_and_the_cli_import_the_demo():
    offenders = {m: sorted(t for t in targets if under(t, "hist_vlm.demo"))
                 for m, targets in import_graph().items()
                 if not any(under(m, allowed) for allowed in ALLOWED_TO_IMPORT_DEMO)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_checks_catch_a_cycle_and_a_library_import_of_the_demo(tmp_path):
    """The graph reader on a small tree of its own: a lazy import closing a cycle and a relative
    import of the demo are found; a TYPE_CHECKING import is not an edge."""
    pkg = tmp_path / "hist_vlm"
    for folder in (pkg, pkg / "models", pkg / "demo"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from hist_vlm.models import b\n")
    (pkg / "models" / "b.py").write_text("def f():\n    from hist_vlm.models.a import x\n")
    (pkg / "models" / "c.py").write_text("from ..demo import run\n")
    (pkg / "models" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from hist_vlm.models import a\n")
    (pkg / "demo" / "run.py").write_text("")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["hist_vlm.models.a", "hist_vlm.models.b"]]
    assert graph["hist_vlm.models.c"] == {"hist_vlm.demo.run"}
    assert graph["hist_vlm.models.d"] == set()


@pytest.mark.parametrize("package", ["hist_vlm.models", "hist_vlm.losses", "hist_vlm.train", "hist_vlm.eval",
                                     "hist_vlm.data", "hist_vlm.text"])
def test_each_library_package_is_in_the_graph(package):
    """The checks above see the library (a path mistake would make them pass on nothing)."""
    assert any(under(m, package) for m in import_graph())
