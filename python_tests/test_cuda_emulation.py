"""The CUDA kernels, run on the CPU: csrc/*/*_kernels.cuh compiled with a C++ compiler under
HYCAM_CUDA_EMULATION (one host thread per CUDA thread, real barriers and warp shuffles, see
csrc/common/cuda_emulation.h) with the launch configurations of the real launchers, against a
float64 computation of KERNELS.md, under AddressSanitizer/UBSan where the toolchain has them.

This checks the kernels' indexing, shared-memory layout, barriers and reductions on machines
without a GPU. It does not replace running them on one (timing, the CUDA math library, the
memory model, compute-sanitizer): the GPU suite does that."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "python_tests" / "cuda_emulation" / "driver.cpp"
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _build(tmp_path) -> pathlib.Path:
    exe = tmp_path / "emu_driver"
    base = [CXX, "-std=c++20", "-O1", "-g", "-DHYCAM_CUDA_EMULATION", f"-I{ROOT / 'csrc'}", str(DRIVER), "-o", str(exe)]
    sanitized = base[:1] + ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] + base[1:] + ["-pthread"]
    proc = subprocess.run(sanitized, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # no sanitizer runtime: still run the emulation
        proc = subprocess.run(base + ["-pthread"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def test_cuda_kernels_in_emulation(tmp_path):
    exe = _build(tmp_path)
    args = [str(exe)] + ([] if os.environ.get("HYCAM_EMULATION_FULL") == "1" else ["--quick"])
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failures: 0" in out, out[-6000:]
