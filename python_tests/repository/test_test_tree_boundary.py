"""Nothing outside python_tests/ depends on it: no include, import, compiler flag or path built in
code, build or setup files names the test tree (the CUDA emulation, which the kernel headers and
benchmarks/gpu_model.py use, lives in csrc/emulation/).

What may name python_tests/ outside it: comments and docstrings saying where something is tested,
documentation (Markdown), and the commands that run the tests (a `pytest` line of a CI or suite
script)."""
import ast
import io
import pathlib
import re
import subprocess
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAME = "python_tests"
C_SUFFIXES = {".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp"}
HASH_COMMENT_SUFFIXES = {".sh", ".toml", ".txt", ".cfg", ".ini", ".cmake", ".yaml", ".yml"}


def _tracked_files():
    try:
        r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
        if r.returncode == 0:
            return [ROOT / f for f in r.stdout.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        pass
    skip = {".git", ".venv", "build", "__pycache__"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def _c_code(text: str) -> str:
    """C/C++ source without its comments (string literals and #include lines stay)."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def c_references(text: str):
    return [n for n, line in enumerate(_c_code(text).split("\n"), 1) if NAME in line]


def python_references(text: str):
    """Lines of imports of, and string constants naming, python_tests (docstrings excepted)."""
    tree = ast.parse(text)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == NAME for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == NAME:
            lines.append(node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME in node.value
              and id(node) not in docstrings):
            lines.append(node.lineno)
    # a name (python_tests.x as an attribute chain, getattr-free) outside strings and comments
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and tok.string == NAME:
            lines.append(tok.start[0])
    return sorted(set(lines))


def script_references(text: str):
    """Lines of a shell/config file naming python_tests outside comments, other than a pytest
    command (running the tests)."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#!") else ""
        if NAME in code and "pytest" not in code:
            out.append(n)
    return out


def references(path: pathlib.Path, text: str):
    if path.suffix in C_SUFFIXES or path.name == "CMakeLists.txt":
        return c_references(text) if path.suffix in C_SUFFIXES else script_references(text)
    if path.suffix == ".py":
        return python_references(text)
    if path.suffix in HASH_COMMENT_SUFFIXES or path.parent.name == ".ci" or text.startswith("#!"):
        return script_references(text)
    return []  # documentation (Markdown), data, images


def test_nothing_outside_python_tests_depends_on_it():
    checked, bad = 0, []
    for p in _tracked_files():
        rel = p.relative_to(ROOT)
        if rel.parts[0] == NAME or not p.is_file():
            continue
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        checked += 1
        bad += [f"{rel}:{n}" for n in references(p, text)]
    assert checked > 50, checked
    assert not bad, "references to python_tests/ outside it (move what they need out of the test tree):\n" + \
        "\n".join(bad)


def test_detects_dependencies():
    assert c_references('#include "../../python_tests/cuda_emulation/driver.cpp"\n') == [1]
    assert c_references('// tested by python_tests/helpers.py\n/* python_tests/conftest.py\n */ int x;\n') == []
    assert c_references('const char* p = "python_tests/helpers.py";\n') == [1]
    py = ('"""Docs: python_tests/helpers.py."""\nimport python_tests.helpers\n'
          'EMU = ROOT / "python_tests" / "cuda_emulation"  # python_tests/conftest.py in a comment\n'
          'def f():\n    """python_tests/conftest.py."""\n    return 1\n')
    assert python_references(py) == [2, 3]
    sh = ("#!/bin/bash\n# python_tests/helpers.py: comment\npytest -q python_tests\n"
          "g++ -Ipython_tests/cuda_emulation x.cpp\n")
    assert script_references(sh) == [4]
