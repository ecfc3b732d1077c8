"""No C++/CUDA function under csrc/ is longer than MAX_LINES: a long kernel is split into named
device functions over one view struct (csrc/cam/cam_kernels.cuh: the CAM backward's phases).

The scanner is a brace matcher over the source with comments, string and character literals and
preprocessor lines blanked out. At namespace, class and `extern "C"` scope, a `{` whose head (the
text since the previous `;`, `{` or `}`) ends in `)` (plus qualifiers, a trailing return type or a
constructor's initialiser list) opens a function body; the body runs to the matching `}` and its
length is counted in lines, both braces included. Lambdas, local classes and nested blocks count
toward the function they are in."""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_LINES = 150
SUFFIXES = {".cpp", ".cu", ".cuh", ".h"}


def _blank(text: str) -> str:
    """The text with comments, string/char literals and preprocessor lines replaced by spaces
    (newlines kept, so that line numbers stay)."""
    out = []
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c in " \t":
            out.append(c)
            i += 1
            continue
        if line_start and c == "#":  # a preprocessor line, with its continuations
            while i < n:
                if text[i] == "\n" and (i == 0 or text[i - 1] != "\\"):
                    break
                out.append("\n" if text[i] == "\n" else " ")
                i += 1
            continue
        line_start = False
        if text.startswith("//", i):
            while i < n and text[i] != "\n":
                out.append(" ")
                i += 1
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i:j]))
            i = j
            continue
        m = re.match(r'R"([^(\s]*)\(', text[i:i + 20]) if c == "R" and (i == 0 or not text[i - 1].isalnum()) else None
        if m:  # raw string literal
            end = ")" + m.group(1) + '"'
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i:j]))
            i = j
            continue
        if c in "\"'":
            if c == "'" and i > 0 and text[i - 1].isalnum():  # a digit separator (1'000)
                out.append(" ")
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(" " * (min(j, n - 1) - i + 1))
            i = j + 1
            continue
        if c == "\n":
            line_start = True
        out.append(c)
        i += 1
    return "".join(out)


_CONTROL = re.compile(r"^\s*(if|for|while|switch|catch|else|do|try)\b")
_TYPE_SCOPE = re.compile(r"\b(struct|class|union|enum)\b")
_NAMESPACE = re.compile(r"^\s*(namespace\b|extern\s*$)")
# what may follow a function's parameter list before its body
_TAIL = re.compile(r"\)\s*(const|noexcept|override|final|mutable|volatile|&|&&|\s)*(->[^{;]*)?$")


def _is_function_head(head: str) -> bool:
    h = " ".join(head.split())
    if not h or _CONTROL.match(h) or _NAMESPACE.match(h):
        return False
    if _TAIL.search(h):
        return True
    # a constructor's initialiser list: `X(args) : a(x), b{y}` ending in `)` or `}`
    return re.search(r"\)\s*:\s*\w", h) is not None and re.search(r"[)}]\s*$", h) is not None


def _name(head: str) -> str:
    """The name before the parameter list: the `(` matching the head's last `)`, once a trailing
    return type and a constructor's initialiser list are cut off."""
    h = re.sub(r"->[^{;]*$", "", " ".join(head.split()))
    m = re.search(r"\)\s*:(?!:)", h)
    if m:
        h = h[:m.start() + 1]
    end = h.rfind(")")
    depth = 0
    for k in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(h[k], 0)
        if depth == 0:
            name = re.search(r"([~\w:]+)\s*(<[^()]*>)?\s*$", h[:k])  # f, or f<float> (a specialisation)
            return name.group(1) if name else "?"
    return "?"


def functions(text: str):
    """(name, first line, body lines) of every function defined at namespace or class scope."""
    src = _blank(text)
    found = []
    stack = []  # kinds of the open braces: "scope" (namespace, class, extern "C") or "other"
    head_start = 0
    i = 0
    while i < len(src):
        c = src[i]
        if c in ";}":
            if c == "}" and stack:
                stack.pop()
            head_start = i + 1
        elif c == "{":
            head = src[head_start:i]
            at_scope = all(k == "scope" for k in stack)
            if at_scope and re.search(r"\)\s*:\s*[^{;]*\w\s*$", " ".join(head.split())):
                # a brace initialiser in a constructor's initialiser list (`y{2}`): part of the head
                depth, j = 1, i + 1
                while j < len(src) and depth:
                    depth += {"{": 1, "}": -1}.get(src[j], 0)
                    j += 1
                i = j
                continue
            if at_scope and _is_function_head(head):
                depth, j = 1, i + 1
                while j < len(src) and depth:
                    depth += {"{": 1, "}": -1}.get(src[j], 0)
                    j += 1
                first = src.count("\n", 0, i) + 1
                last = src.count("\n", 0, j - 1) + 1
                found.append((_name(head), first, last - first + 1))
                i = j
                head_start = j
                continue
            kind = "scope" if at_scope and (_NAMESPACE.match(" ".join(head.split()) or "x") or
                                            _TYPE_SCOPE.search(head) or not head.strip()) else "other"
            stack.append(kind)
            head_start = i + 1
        i += 1
    return found


def _sources():
    return sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in SUFFIXES)


def test_no_function_longer_than_the_limit():
    seen, long = [], []
    for p in _sources():
        for name, line, n in functions(p.read_text()):
            seen.append((p, name, n))
            if n > MAX_LINES:
                long.append(f"{p.relative_to(ROOT)}:{line} {name}: {n} lines")
    # the scanner finds the functions it should: a plausible count, the kernels among them
    assert len(seen) > 150, len(seen)
    names = {name for _, name, _ in seen}
    for f in ("cam_forward_kernel", "cam_backward_kernel", "backward_elementwise", "cam_forward_impl",
              "cam_backward_impl", "shrink_backward_impl", "check_arg", "cam_forward_cuda"):
        assert f in names, f
    assert max(n for _, _, n in seen) > 50
    assert not long, "functions over %d lines (split them):\n%s" % (MAX_LINES, "\n".join(long))


def test_scanner_flags_a_long_kernel():
    """The CAM backward's phases pasted back into one kernel, as it was written before they were
    split, is over the limit; its parts are not."""
    text = (ROOT / "csrc/cam/cam_kernels.cuh").read_text()
    lines = text.split("\n")
    parts = {name: (line, n) for name, line, n in functions(text)}
    body = []
    for phase in ("backward_stage_tile", "backward_elementwise", "backward_dw", "backward_dB"):
        line, n = parts[phase]
        assert n <= MAX_LINES
        start = next(k for k in range(line - 1, line + 5) if lines[k].rstrip().endswith("{"))
        body += lines[start + 1:line - 1 + n - 1]
    kernel = ("template <typename scalar_t, typename acc_t, typename M = void>\n"
              "HYCAM_GLOBAL void HYCAM_LAUNCH_BOUNDS(kThreads, 2)\n"
              "    cam_backward_kernel(const HYCAM_GRID_CONSTANT CamParams<scalar_t, acc_t> params) {\n"
              "  for (int64_t t0 = 0; t0 < 1; ++t0) {\n" + "\n".join(body) + "\n  }\n}\n")
    found = functions("namespace hycam {\n" + kernel + "}  // namespace hycam\n")
    assert [name for name, _, _ in found] == ["cam_backward_kernel"]
    assert found[0][2] > MAX_LINES, found


def test_scanner_flags_the_kernel_before_the_split():
    """The 300-line cam_backward_kernel this test was written against, from the history where the
    checkout has it."""
    rev = "4deb35a"
    try:
        r = subprocess.run(["git", "show", f"{rev}:csrc/cam/cam_kernels.cuh"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git")
    if r.returncode != 0:
        pytest.skip(f"{rev} is not in this checkout's history")
    found = {name: n for name, _, n in functions(r.stdout)}
    assert found["cam_backward_kernel"] > 300, found
    assert found["cam_forward_kernel"] < MAX_LINES


def test_scanner_basics():
    src = '''
namespace a {
struct S {
  int f() const { return 1; }
  S() : x(1), y{2} {
    if (x) { y = 3; }
  }
  int x, y;
};
#define M(x) \\
  void g() { \\
  }
template <typename T>
auto h(T t) -> decltype(t) {
  auto l = [&](int q) { return q; };  // { not a brace
  const char* s = "}";
  return l(t);
}
extern "C" {
int k(void) {
  return 0;
}
}
}  // namespace a
'''
    got = {name: n for name, _, n in functions(src)}
    assert got == {"f": 1, "S": 3, "h": 5, "k": 3}, got
