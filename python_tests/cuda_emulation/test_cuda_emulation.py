"""The CUDA kernels, run on the CPU: csrc/*/*_kernels.cuh compiled with a C++ compiler under
HYCAM_CUDA_EMULATION (csrc/emulation/cuda_emulation.h: one fiber per CUDA thread,
real barriers and warp collectives with the GPU's rules enforced) with the launch configurations
of the real launchers, against a float64 computation of docs/formulas.md, under AddressSanitizer/UBSan
where the toolchain has them.

Also here: each bug class the emulator must reject, seeded in a small kernel of
cuda_emulation/cases.cpp (never in csrc/), the memory-traffic counters on toy kernels with known
answers, and a ThreadSanitizer build on a small case.

This checks the kernels' indexing, shared-memory layout, barriers and reductions on machines
without a GPU. It does not replace running them on one (timing, the CUDA math library, the
memory model, compute-sanitizer): the GPU suite does that."""
import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMU = ROOT / "python_tests" / "cuda_emulation"
DRIVER = EMU / "driver.cpp"
CASES = EMU / "cases.cpp"
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _compile(src, exe, sanitize=None, opt="-O1"):
    base = [CXX, "-std=c++20", opt, "-g", "-DHYCAM_CUDA_EMULATION", f"-I{ROOT / 'csrc'}", str(src),
            "-o", str(exe), "-pthread"]
    if sanitize:
        cmd = base[:1] + [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] + base[1:]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return subprocess.run(base, capture_output=True, text=True, timeout=900)


def _build(tmp_path) -> pathlib.Path:
    exe = tmp_path / "emu_driver"
    proc = _compile(DRIVER, exe, sanitize="address,undefined")
    if proc.returncode != 0:  # no sanitizer runtime: still run the emulation
        proc = _compile(DRIVER, exe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def test_cuda_kernels_in_emulation(tmp_path):
    exe = _build(tmp_path)
    args = [str(exe)] + ([] if os.environ.get("HYCAM_EMULATION_FULL") == "1" else ["--quick"])
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="halt_on_error=1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failures: 0" in out, out[-6000:]
    # the CAM kernels ran with the 16-bit storage types the .cu files instantiate
    for dtype in ("half", "bfloat16"):
        assert "cam    T=" in out and f"{dtype} acc float" in out, out[-3000:]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emu_cases") / "cases"
    proc = _compile(CASES, exe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _run(exe, name):
    return subprocess.run([str(exe), name], capture_output=True, text=True, timeout=120)


# case -> substrings the rejection must contain (besides the kernel's name and "emulated CUDA error")
BROKEN = {
    "broken_shfl_after_exit": ["__shfl_down_sync at cases.cpp:", "lane 20 exits while its warp waits"],
    "broken_shfl_lanes_exited_first": ["__shfl_down_sync at cases.cpp:", "names lane 0", "already exited"],
    "broken_shfl_divergent": ["different warp collectives", "cases.cpp:"],
    "broken_sync_after_partial_return": ["wait at __syncthreads() at cases.cpp:", "thread 40"],
    "broken_sync_after_early_exit": ["__syncthreads() at cases.cpp:", "after thread 0 of the block has exited"],
    "broken_sync_divergent": ["__syncthreads() reached from different call sites in one phase", "cases.cpp:"],
    "broken_deadlock": ["deadlock", "__shfl_down_sync (cases.cpp:"],
    "broken_wmma_missing_lanes": ["wmma::load_matrix_sync", "cases.cpp:", "exits while its warp waits"],
    "broken_smem_past_end": ["dynamic shared memory accessed at byte 1024 of a launch with 1024 bytes"],
    "broken_smem_in_padding": ["dynamic shared memory at byte 1028 of a launch with 1028 bytes"],
    "broken_smem_too_large": ["307200 bytes of dynamic shared memory"],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_emulator_rejects_seeded_bug(cases, name):
    proc = _run(cases, name)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{name} was not rejected:\n{err[-2000:]}"
    assert "finished" not in proc.stdout
    assert f"emulated CUDA error in kernel {name}_kernel" in err, err[-2000:]
    for s in BROKEN[name]:
        assert s in err, f"{name}: {s!r} not in\n{err[-2000:]}"


def test_emulator_accepts_correct_patterns(cases):
    proc = _run(cases, "good_patterns")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def _counters(cases, name):
    proc = _run(cases, name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[0])


def test_counters_coalesced_16_byte_copy(cases):
    c = _counters(cases, "toy_copy16")  # 4096 x 16 B, one element per thread, 128-byte aligned
    for kind in ("load", "store"):
        t = c[kind]
        assert t["requests"] == 4096 // 32
        assert t["sectors"] == 4096 * 16 // 32  # 16 sectors per warp request
        assert t["lines"] == 4096 * 16 // 128  # 4 L1 wavefronts per request
        assert t["request_unique_bytes"] == t["sectors"] * 32  # sector efficiency 100 %
        assert t["unique_bytes"] == 4096 * 16


def test_counters_coalesced_2_byte_copy(cases):
    c = _counters(cases, "toy_copy2")
    t = c["load"]
    assert t["requests"] == 8192 // 32 and t["sectors"] == 2 * t["requests"]  # 64 B per request
    assert t["request_unique_bytes"] == 32 * t["sectors"]


@pytest.mark.parametrize("r", [4, 16])
def test_counters_stride_r_gather(cases, r):
    # thread j reads the r 2-byte values B[j, 0..r) one by one (today's reads of B): each warp
    # request touches 32 lanes 2r bytes apart -> min(32, 32 * 2r / 32) sectors for 64 bytes used
    c = _counters(cases, f"toy_gather_r{r}")
    t, d = c["load"], 1024
    assert t["requests"] == d // 32 * r
    per_request = 32 if 2 * r >= 32 else 32 * 2 * r // 32
    assert t["sectors"] == t["requests"] * per_request
    assert t["request_unique_bytes"] == t["requests"] * 64
    assert t["unique_bytes"] == d * r * 2  # each byte of B once: the DRAM proxy
    eff = t["request_unique_bytes"] / (32 * t["sectors"])
    assert abs(eff - 64 / (32 * per_request)) < 1e-12


@pytest.mark.parametrize("pattern,wavefronts,ideal", [
    ("f32_contig", 1, 1), ("f32_stride32", 32, 1), ("f32_stride2", 2, 1), ("f32_broadcast", 1, 1),
    ("v16_contig", 4, 4), ("v16_broadcast", 1, 1), ("v16_stride128", 32, 4),
])
def test_counters_shared_memory_banks(cases, pattern, wavefronts, ideal):
    """Bank conflicts from the lanes' addresses (32 banks of 4 bytes, 128 bytes per wavefront,
    broadcasts free): one warp instruction of each pattern."""
    c = _counters(cases, f"toy_bank_{pattern}")["smem_plain"]
    assert (c["requests"], c["wavefronts"], c["ideal"]) == (1, wavefronts, ideal), c


@pytest.mark.parametrize("name,wavefronts,ideal", [
    ("toy_frag_128B_rows", 32, 4),  # 8 rows of each 8 x 8 matrix on the same 4 banks: 8-way
    ("toy_frag_144B_rows", 4, 4),   # 16 bytes of padding per row: conflict-free
    ("toy_frag_store", 8, 8),       # float accumulator rows 8 words apart: 4 x 2 half-warp phases
])
def test_counters_fragment_banks(cases, name, wavefronts, ideal):
    c = _counters(cases, name)["smem_frag"]
    assert (c["wavefronts"], c["ideal"]) == (wavefronts, ideal), c


def test_counters_mma(cases):
    assert _counters(cases, "toy_mma")["mma"] == 2 * 3 * 5  # blocks x warps x mma per warp


def test_thread_sanitizer_small_case(tmp_path):
    """The emulation under ThreadSanitizer: fibers are TSan fibers switched without implied
    synchronisation, so only the emulated barriers order the threads. The correct patterns run
    clean; a shared-memory exchange with its barrier removed is reported as a data race."""
    exe = tmp_path / "cases_tsan"
    proc = _compile(CASES, exe, sanitize="thread")
    if proc.returncode != 0:
        pytest.skip(f"no ThreadSanitizer runtime for {CXX}: {proc.stderr[-500:]}")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    good = subprocess.run([str(exe), "good_patterns"], capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0 and "ok" in good.stdout, good.stdout + good.stderr[-4000:]
    race = subprocess.run([str(exe), "broken_missing_barrier"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert race.returncode == 66 and "data race" in race.stderr, race.stdout + race.stderr[-4000:]
