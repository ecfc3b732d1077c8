"""Every repository path that code, comments and docs name exists.

Scanned: the repository's text files (tracked, or untracked and not ignored) except the recorded
results under benchmarks/results/, which keep the commands and logs of past runs as they were.
A reference is
- a path from the repository root, starting with one of its top-level directories
  (`csrc/cam/cam_kernels.cuh`, `docs/`); `{a,b}` is expanded, a `*` pattern must match a
  repository file, and a `<placeholder>` component (`benchmarks/results/gpu-<date>`) is checked
  up to the directory above it;
- in a file under csrc/, a path from csrc/ (the include root: `common/hycam_math.h`);
- in Markdown, a link target (relative to the file) and a bare file name in backticks that
  follows a backticked path on the same line (the table row `csrc/cam/cam_cpu.cpp`,
  `cam_cuda.cu` names csrc/cam/cam_cuda.cu).
A path that git ignores (a build output such as hycam_ext/_C*.so) is not a repository file and
is not checked."""
import fnmatch
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Set, Tuple

from python_tests.helpers import ROOT, repository_files

TEXT_SUFFIXES = {".py", ".h", ".hpp", ".cpp", ".cu", ".cuh", ".md", ".sh", ".txt", ".toml",
                 ".cfg", ".cmake", ".yml", ".yaml", ".ini"}
SKIP_PREFIXES = ("benchmarks/results/",)
_CHARS = r"[\w.{},+*<>/-]"


def existing_repository_files() -> List[str]:
    return sorted(f for f in repository_files() if (ROOT / f).is_file())


def scanned(files: List[str]) -> List[str]:
    return [f for f in files if not f.startswith(SKIP_PREFIXES) and (
        Path(f).suffix in TEXT_SUFFIXES or f.startswith(".ci/") or Path(f).name == "CMakeLists.txt")]


def expand_braces(path: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in expand_braces(path[:m.start()] + alt + path[m.end():])]


def exists(ref: str, files: Set[str], dirs: Set[str]) -> bool:
    """Whether ``ref`` (from the repository root) names a repository file or directory."""
    parts = ref.rstrip("/").split("/")
    if any("<" in p or ">" in p for p in parts):
        keep = next(i for i, p in enumerate(parts) if "<" in p or ">" in p)
        return keep == 0 or "/".join(parts[:keep]) in dirs
    ref = "/".join(parts)
    if "*" in ref or "?" in ref:
        return any(fnmatch.fnmatchcase(f, ref) for f in files)
    return ref in files or ref in dirs


def references(path: str, text: str, tops: List[str], csrc_dirs: List[str]
               ) -> Iterator[Tuple[int, str, str]]:
    """(line, reference as written, path from the repository root) for every reference."""
    rooted = re.compile(r"(?<![\w./-])((?:%s)/%s*)" % ("|".join(map(re.escape, tops)), _CHARS))
    in_csrc = re.compile(r"(?<![\w./-])((?:%s)/%s*)" % ("|".join(map(re.escape, csrc_dirs)), _CHARS))
    md_link = re.compile(r"\]\(([^)\s#]+)")
    backticked = re.compile(r"`([^`\s]+)`")
    here = str(Path(path).parent)
    for no, line in enumerate(text.splitlines(), 1):
        for m in rooted.finditer(line):
            ref = m.group(1).rstrip(".,:;")
            for p in expand_braces(ref):
                yield no, ref, p
        if path.startswith("csrc/"):
            for m in in_csrc.finditer(line):
                ref = m.group(1).rstrip(".,:;")
                for p in expand_braces(ref):
                    yield no, ref, "csrc/" + p
        if path.endswith(".md"):
            for m in md_link.finditer(line):
                target = m.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                yield no, target, str((Path(here) / target)).replace("\\", "/")
            base = None
            for m in backticked.finditer(line):
                tok = m.group(1).rstrip(".,:;")
                if "/" in tok and tok.split("/")[0] in tops:
                    base = tok.rsplit("/", 1)[0]
                elif base and "/" not in tok and re.fullmatch(r"[\w.-]+\.[A-Za-z]{1,4}", tok):
                    yield no, tok, f"{base}/{tok}"
                else:
                    base = None


def _normalise(p: str) -> str:
    out: List[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            else:
                return "../" + p
        else:
            out.append(part)
    return "/".join(out)


def ignored_by_git(path: str) -> bool:
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=str(ROOT),
                       capture_output=True, timeout=60)
    return r.returncode == 0


def stale_references(root: Path = ROOT) -> List[str]:
    files = existing_repository_files()
    file_set = set(files)
    dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    tops = sorted({f.split("/")[0] for f in files if "/" in f})
    csrc_dirs = sorted({f.split("/")[1] for f in files if f.startswith("csrc/") and f.count("/") >= 2})
    out = []
    for f in scanned(files):
        try:
            text = (root / f).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for no, ref, p in references(f, text, tops, csrc_dirs):
            p = _normalise(p)
            if not exists(p, file_set, dirs) and not ignored_by_git(p):
                out.append(f"{f}:{no}: {ref}" + (f" ({p})" if p != ref else ""))
    return out


def test_every_named_repository_path_exists():
    stale = stale_references()
    assert not stale, "paths named in code, comments or docs that do not exist:\n" + "\n".join(stale)


def test_the_scanner_finds_each_kind_of_reference():
    # top-level directories "src" and "doc", which this repository does not have, so that the
    # examples below are no references of this file
    tops, csrc_dirs = ["src", "doc"], ["cam", "common"]
    text = ("see src/cam/cam_{cpu.cpp,cuda.cu}, src/*/*_kernels.cuh and doc/\n"
            "`src/cam/cam_cpu.cpp`, `cam_cuda.cu` | [formulas](formulas.md)\n"
            "tests/x /tmp/src/not_ours.h common/hycam_math.h\n")
    md = [(n, p) for n, _, p in references("doc/kernels.md", text, tops, csrc_dirs)]
    assert md == [(1, "src/cam/cam_cpu.cpp"), (1, "src/cam/cam_cuda.cu"),
                  (1, "src/*/*_kernels.cuh"), (1, "doc/"), (2, "src/cam/cam_cpu.cpp"),
                  (2, "doc/formulas.md"), (2, "src/cam/cam_cuda.cu")]
    in_csrc = [p for _, _, p in references("csrc/api.cpp", text, tops, csrc_dirs)]
    assert "csrc/common/hycam_math.h" in in_csrc and "src/cam/cam_cuda.cu" in in_csrc
    files = {"src/cam/cam_cpu.cpp", "src/cam/cam_kernels.cuh", "doc/x.md"}
    dirs = {"src", "src/cam", "doc"}
    assert exists("src/*/*_kernels.cuh", files, dirs) and exists("doc/", files, dirs)
    assert exists("src/<area>/x.h", files, dirs) and not exists("bench/<date>", files, dirs)
    assert not exists("src/cam/cam_cuda.cu", files, dirs)
    assert _normalise("doc/../src/./cam") == "src/cam"
    assert ignored_by_git("hycam_ext/_C*.so") and not ignored_by_git("hycam_ext/ops.py")
