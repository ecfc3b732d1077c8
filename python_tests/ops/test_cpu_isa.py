"""The instruction-set variants of the CPU kernels (csrc/cpu/isa.h): every variant within dtype
accuracy of float64, per-token results independent of the batch in every variant, float64 and
the results no row kernel touches bitwise the same in every variant, the automatic choice, the
HYCAM_CPU_ISA override, and no AVX code leaking out of the avx2 variant.

The variant is chosen once per process, so each variant runs in its own process
(cpu_isa_worker.py)."""
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hycam_ext
from hycam_ext import ops
from python_tests.helpers import ROOT, worker_env

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="hycam_ext._C not built")

LOW = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}  # relative to the largest |value|
SHAPES = [(37, 203, 3, 5, 0, True), (70, 72, 4, 16, 1, True), (5, 7, 2, 3, 0, False)]  # T, d, K, r, placement, bias


def _cases():
    """Each shape and routing in every dtype, plus the float64 op on the same (rounded) inputs of
    each low dtype as its accuracy reference."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for T, d, K, r, placement, bias in SHAPES:
        for hard in (False, True):
            def rnd(*s, scale=0.5):
                return torch.randn(*s, generator=gen, dtype=torch.float64) * scale
            logits = rnd(T, K, scale=1.0)
            g = torch.nn.functional.one_hot(logits.argmax(-1), K).double() if hard else logits.softmax(-1)
            c = dict(x=rnd(T, d), p=rnd(T, K, r), A=rnd(K, r, d, scale=0.1), A_bias=rnd(K, r) if bias else None,
                     N=rnd(K, r, r, scale=0.2), N_bias=rnd(K, r) if bias else None,
                     h=rnd(T, d), a=rnd(T, d) if placement == 1 or bias else None, z=rnd(T, d), go=rnd(T, d),
                     w=rnd(T, K, r), B=rnd(K, d, r), b=rnd(K, d) if bias else None, g=g,
                     zb=rnd(d) if bias else None,
                     dw=rnd(T, K, r) * (g != 0).unsqueeze(-1), scale=1.7, placement=placement)
            name = f"{T}x{d}x{K}x{r}-{'hard' if hard else 'soft'}"
            out.append((f"{name}-float64", c))
            for dt in LOW:
                low = {k: v.to(dt) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
                out.append((f"{name}-{dt}", low))
                out.append((f"{name}-{dt}-ref", {k: v.double() if isinstance(v, torch.Tensor) else v
                                                 for k, v in low.items()}))
    return out


def _run_worker(tmp, isa):
    """(outputs, None) from a process with HYCAM_CPU_ISA=isa (None: unset), or (None, reason) when
    this build or CPU has no such variant."""
    src, dst = tmp / "cases.pt", tmp / f"out-{isa}.pt"
    if not src.exists():
        torch.save(_cases(), src)
    env = worker_env()
    env.pop("HYCAM_CPU_ISA", None)
    if isa is not None:
        env["HYCAM_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-m", "python_tests.ops.cpu_isa_worker", str(src), str(dst)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0:
        m = re.search(r"HYCAM_CPU_ISA=\w+, but [^;]*", proc.stderr)
        if m:
            return None, m.group(0)
        raise AssertionError(f"worker with HYCAM_CPU_ISA={isa} failed:\n{proc.stderr[-4000:]}")
    return torch.load(dst), None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_isa")
    res = {}
    for isa in (None, "baseline", "avx2"):
        res[isa] = _run_worker(tmp, isa)
    return res


def _variants(runs):
    return {isa: out for isa, (out, _) in runs.items() if isa is not None and out is not None}


def _variant(runs, isa):
    out, why = runs[isa]
    if out is None:
        pytest.skip(why)
    return out


def _need_two(runs):
    if runs["avx2"][0] is None:
        pytest.skip(f"one variant only: {runs['avx2'][1]}")


def test_auto_picks_the_best_variant(runs):
    auto, _ = runs[None]
    want = "avx2" if runs["avx2"][0] is not None else "baseline"
    assert auto["isa"] == want
    chosen = runs[want][0]
    for name, res in auto["cases"].items():
        for k, v in res["full"].items():
            assert torch.equal(v, chosen["cases"][name]["full"][k]), (name, k)


def test_variant_names(runs):
    for isa, out in _variants(runs).items():
        assert out["isa"] == isa


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_variant_within_dtype_accuracy_of_float64(runs, isa):
    out = _variant(runs, isa)
    checked = 0
    for name, res in out["cases"].items():
        dt = next((d for d in LOW if name.endswith(f"-{d}")), None)
        if dt is None:
            continue
        ref = out["cases"][f"{name}-ref"]["full"]
        for k, v in res["full"].items():
            assert v.dtype == dt
            exact = ref[k]
            if k == "dz_bias" and exact.numel() == 0:  # no z_bias in this case: an empty output
                assert v.numel() == 0, (name, k)
                continue
            err = ((v.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()
            assert err < TOL[dt], (name, k, err)
            checked += 1
    with_bias = sum(bias for *_, bias in SHAPES)
    assert checked == len(SHAPES) * 2 * len(LOW) * 14 + with_bias * 2 * len(LOW)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_per_token_results_do_not_depend_on_the_batch_in_every_variant(runs, isa):
    out = _variant(runs, isa)
    n = 0
    for name, res in out["cases"].items():
        for (s0, s1), part in res["parts"].items():
            for k, v in part.items():
                assert torch.equal(v, res["full"][k][s0:s1]), (name, (s0, s1), k)
                n += 1
    assert n > 0


def test_float64_is_bitwise_the_same_in_every_variant(runs):
    """float64 always runs the baseline variant."""
    _need_two(runs)
    base, avx2 = runs["baseline"][0]["cases"], runs["avx2"][0]["cases"]
    n = 0
    for name in base:
        if name.endswith("-float64") or name.endswith("-ref"):
            for k, v in base[name]["full"].items():
                assert torch.equal(v, avx2[name]["full"][k]), (name, k)
                n += 1
    assert n > 0


def test_results_without_row_kernels_are_bitwise_the_same_in_every_variant(runs):
    """Given the same dw and p, shrink_backward's dN, dN_bias and dA_bias come from scalar code
    that keeps its products unfused, not from the row kernels: no variant may change them. dx and dA go through the row kernels, which in the avx2 variant use FMA and 8-lane sums."""
    _need_two(runs)
    base, avx2 = runs["baseline"][0]["cases"], runs["avx2"][0]["cases"]
    for name in base:
        for k in ("dN", "dN_bias", "dA_bias"):
            assert torch.equal(base[name]["full"][k], avx2[name]["full"][k]), (name, k)


def test_bad_override_is_an_error_naming_the_variable():
    env = worker_env(HYCAM_CPU_ISA="sse9")
    code = ("import torch, hycam_ext\n"
            "x = torch.randn(3, 5); A = torch.randn(2, 4, 5); N = torch.randn(2, 4, 4)\n"
            "try:\n    torch.ops.hycam.shrink(x, A, None, N, None)\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError: HYCAM_CPU_ISA must be auto, baseline or avx2, got 'sse9'" in proc.stdout


# The C++ files compiled once per variant (kernel_includes.h must list their std/ATen headers).
KERNEL_SOURCES = ["cam/cam_cpu.cpp", "shrink/shrink_cpu.cpp", "common/cpu_rows.h", "common/cpu_utils.h",
                  "common/hycam_math.h", "kernels.h", "cpu/isa.h"]


def test_kernel_sources_include_system_headers_only_from_the_list():
    """A std/ATen header first included inside the avx2 target region would compile its inline
    functions for AVX2, for every caller (see csrc/cpu/kernel_includes.h)."""
    listed = set(re.findall(r"#include\s*<([^>]+)>", (ROOT / "csrc/cpu/kernel_includes.h").read_text()))
    assert "ATen/ATen.h" in listed
    for src in KERNEL_SOURCES:
        used = set(re.findall(r"#include\s*<([^>]+)>", (ROOT / "csrc" / src).read_text()))
        assert used <= listed, (src, sorted(used - listed))


def test_no_avx_code_outside_the_avx2_variant(runs):
    """Only functions of namespace hycam::avx2 may use AVX instructions: any other (an inline
    std/ATen function compiled inside the target region) could be the copy the linker keeps for
    baseline callers."""
    _need_two(runs)
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() != "x86_64":
        pytest.skip("needs objdump on x86-64")
    lib = pathlib.Path(hycam_ext._C.__file__)
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    fn, avx_fns, leaks = None, set(), set()
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", line)
        if m and fn and (m.group(1).startswith("v") or "%ymm" in m.group(2)):
            avx_fns.add(fn)
            if not re.match(r"_Z+N5hycam4avx2", fn):  # hycam::avx2::..., or a local entity of one
                leaks.add(fn)
    assert avx_fns, "the avx2 variant has no AVX code"
    assert not leaks, sorted(leaks)[:20]
