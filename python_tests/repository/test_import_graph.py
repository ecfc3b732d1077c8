"""hycam_ext has no import cycle: the graph of its modules, built with ast from every import
statement (function-level and conditional ones included, only `if TYPE_CHECKING:` blocks left
out, since they never run), is acyclic. An edge goes to the module an import names: `import
a.b` and `from a import b` (b a submodule) to a.b, `from a import name` (an attribute) to the
module or package __init__ a itself."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

from python_tests.helpers import ROOT

PACKAGE = "hycam_ext"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def extension_modules(root: Path = ROOT) -> Set[str]:
    """The compiled modules setup.py builds (hycam_ext._C): leaves of the graph, which a checkout
    holds only after a build, so `from . import _C` is an edge to them, not to the package."""
    return set(re.findall(r'Extension\(\s*"([\w.]+)"', (root / "setup.py").read_text()))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: Dict[str, Path], leaves: Set[str] = frozenset()) -> Dict[str, Dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}; ``leaves``:
    modules without a .py file (compiled), which import nothing of the package."""
    graph: Dict[str, Dict[str, int]] = {leaf: {} for leaf in leaves}
    known = set(modules) | set(leaves)
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: Dict[str, int] = {}

        def add(target: str, line: int) -> None:
            if target in known and target != name:
                edges.setdefault(target, line)

        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
                continue
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for alias in node.names:
                sub = f"{src}.{alias.name}"
                add(sub if sub in known else src, node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(cycle: List[str], graph, modules) -> str:
    members = set(cycle)
    lines = [f"  {a} -> {b}  ({modules[a].relative_to(ROOT)}:{line})"
             for a in cycle for b, line in sorted(graph[a].items()) if b in members]
    return "import cycle among " + ", ".join(cycle) + ":\n" + "\n".join(lines)


def test_hycam_ext_has_no_import_cycle():
    modules = module_files()
    assert "hycam_ext.finetune.cli" in modules and "hycam_ext.ops" in modules
    leaves = extension_modules()
    assert leaves == {"hycam_ext._C"}
    graph = import_graph(modules, leaves)
    assert "hycam_ext._C" in graph["hycam_ext._extension"]
    # the cycle this test was written for: cli.py and compare.py both use runner.py instead
    assert "hycam_ext.finetune.runner" in graph["hycam_ext.finetune.compare"]
    assert "hycam_ext.finetune.cli" not in graph["hycam_ext.finetune.compare"]
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph, modules) for c in cycles)


def _write(root: Path, files: Dict[str, str]) -> Dict[str, Path]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return module_files(root, "pkg")


def test_graph_sees_function_level_relative_and_attribute_imports(tmp_path):
    """The checker itself: a cycle hidden in a function-level import is found, so are the edges
    of `from . import sub`, `from .mod import name`, absolute imports and parent-package
    attributes; `if TYPE_CHECKING:` imports are not edges."""
    modules = _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from .b import g\n    return g\n",
        "pkg/b.py": "import pkg.c\nfrom typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from .a import f\n",
        "pkg/c.py": "def h():\n    from . import a\n",
        "pkg/sub/__init__.py": "from .. import d\n",
        "pkg/d.py": "from pkg import f\nfrom . import _ext\n",
    })
    graph = import_graph(modules, {"pkg._ext"})
    assert graph["pkg"] == {"pkg.a": 1}
    assert graph["pkg.a"] == {"pkg.b": 2}
    assert graph["pkg.b"] == {"pkg.c": 1}                # the TYPE_CHECKING import is no edge
    assert graph["pkg.c"] == {"pkg.a": 2}
    assert graph["pkg.sub"] == {"pkg.d": 1}
    assert graph["pkg.d"] == {"pkg": 1, "pkg._ext": 2}   # an attribute of the package: its __init__
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert find_cycles({"x": {"y": 1}, "y": {}}) == []
