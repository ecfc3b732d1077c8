"""Machine code and occupancy of the CUDA kernels, without a GPU.

Reads the kernels' cubins, from the built extension (hycam_ext/_C*.so of a CUDA build) or, when
there is none, from the kernel headers compiled here with nvcc for the same templates the
launchers instantiate (cam_cuda.cu / shrink_cuda.cu: float, double, c10::Half, c10::BFloat16 with
their at::opmath_type accumulators, and the tensor-core kernels for __half / __nv_bfloat16) and
the project's nvcc flags. Per kernel and arch: registers, static shared memory, local memory
(spills, stack), global load/store instructions by width (share of 128-bit accesses), tensor-core
(HMMA) instructions; and the theoretical occupancy of a launch by the CUDA occupancy rules of
sm_80 / sm_90 (constants below, with sources).

    python -m benchmarks.gpu_occupancy [--so PATH] [--arch 80,90]
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Per-SM limits by compute capability. Source: CUDA C++ Programming Guide, "Compute Capabilities",
# table "Technical Specifications per Compute Capability" (8.0 = A100, 9.0 = H100), and the CUDA
# Occupancy Calculator's allocation rules (cuda_occupancy.h in the toolkit): registers are allocated
# per warp in units of 256, shared memory in units of 128 bytes, and from sm_80 on every resident
# block also reserves 1 KB of shared memory for the system.
ARCH = {
    80: dict(name="A100 (sm_80)", max_threads_sm=2048, max_warps_sm=64, max_blocks_sm=32, regs_sm=65536,
             reg_unit=256, max_regs_thread=255, smem_sm=164 * 1024, smem_block_optin=163 * 1024,
             smem_unit=128, smem_reserved_block=1024),
    90: dict(name="H100 (sm_90)", max_threads_sm=2048, max_warps_sm=64, max_blocks_sm=32, regs_sm=65536,
             reg_unit=256, max_regs_thread=255, smem_sm=228 * 1024, smem_block_optin=227 * 1024,
             smem_unit=128, smem_reserved_block=1024),
}


def _ceil(a, b):
    return -(-a // b)


@dataclasses.dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # resident warps / max warps
    limiter: str  # what bounds blocks_per_sm


def occupancy(arch: int, threads: int, regs: int, static_smem: int, dynamic_smem: int) -> Occupancy:
    """Theoretical occupancy of one kernel launch on one SM (the occupancy calculator's rules).
    static_smem: as cuobjdump reports it (excludes the per-block reservation)."""
    a = ARCH[arch]
    if threads <= 0 or threads > 1024:
        raise ValueError(f"threads={threads}: a block has 1..1024 threads")
    if regs > a["max_regs_thread"]:
        raise ValueError(f"regs={regs} > {a['max_regs_thread']}")
    warps = _ceil(threads, 32)
    smem_block = static_smem + dynamic_smem
    limits = {"blocks": a["max_blocks_sm"], "warps": a["max_warps_sm"] // warps}
    regs_warp = _ceil(max(regs, 1) * 32, a["reg_unit"]) * a["reg_unit"]
    limits["registers"] = (a["regs_sm"] // regs_warp) // warps
    if smem_block > a["smem_block_optin"]:
        limits["shared memory"] = 0
    else:
        per_block = _ceil(smem_block + a["smem_reserved_block"], a["smem_unit"]) * a["smem_unit"]
        limits["shared memory"] = a["smem_sm"] // per_block
    limiter = min(limits, key=lambda k: limits[k])
    b = limits[limiter]
    return Occupancy(b, b * warps, b * warps / a["max_warps_sm"], limiter)


# ---- finding and reading cubins ------------------------------------------------------------------

def tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: on PATH, next to nvcc, or in the triton wheel."""
    p = shutil.which(name)
    if p:
        return p
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = pathlib.Path(os.path.realpath(nvcc)).parent / name
        if cand.exists():
            return str(cand)
    try:
        import triton

        cand = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return None


def built_extension() -> str | None:
    """hycam_ext/_C*.so when it holds CUDA code (a CUDA build), else None."""
    cuobjdump = tool("cuobjdump")
    for so in sorted(glob.glob(str(ROOT / "hycam_ext" / "_C*.so"))):
        if cuobjdump is None:
            return None
        r = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
        if r.returncode == 0 and ".cubin" in r.stdout:
            return so
    return None


# The templates cam_cuda.cu and shrink_cuda.cu instantiate (AT_DISPATCH_FLOATING_TYPES_AND2(Half,
# BFloat16): scalar_t, at::opmath_type<scalar_t> and, for the CAM backward, the wmma type or void),
# plus the tensor-core kernels' wmma types.
_INSTANTIATIONS = r"""
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cam/cam_kernels.cuh"
#include "shrink/shrink_kernels.cuh"
using namespace hycam;
template <typename S, typename A, typename M>
void* const* plain() {
  static void* const k[] = {
      (void*)&cam_kernels::cam_forward_kernel<S, A>, (void*)&cam_kernels::cam_backward_kernel<S, A, M>,
      (void*)&cam_kernels::sum_dwdg_kernel<S, A>, (void*)&shrink_kernels::shrink_kernel<S, A>,
      (void*)&shrink_kernels::mix_kernel<S, A>, (void*)&shrink_kernels::dp_kernel<S, A>,
      (void*)&shrink_kernels::dx_kernel<S, A>, (void*)&shrink_kernels::dA_kernel<S, A>,
      (void*)&shrink_kernels::small_reductions_kernel<S, A>};
  return k;
}
template <typename M>
void* const* tc() {
  static void* const k[] = {(void*)&shrink_kernels::shrink_tc_kernel<M>, (void*)&shrink_kernels::shrink_finish_kernel<M>,
                            (void*)&shrink_kernels::dx_tc_kernel<M>,
                            (void*)&shrink_kernels::dA_tc_kernel<M>};
  return k;
}
void* const* hycam_all_kernels[] = {plain<float, float, void>(), plain<double, double, void>(),
                                    plain<c10::Half, float, __half>(), plain<c10::BFloat16, float, __nv_bfloat16>(), tc<__half>(), tc<__nv_bfloat16>(),
                      reinterpret_cast<void* const*>(&cuda::sum_partials_kernel<float>),
                      reinterpret_cast<void* const*>(&cuda::sum_partials_kernel<double>)};
"""


def _torch_include() -> str:
    import torch.utils.cpp_extension as ce

    return ce.include_paths()[0]


def compile_kernels(arch: int, cache_dir: str | None = None) -> str:
    """nvcc -cubin of the kernel headers for one arch with the extension's device flags (setup.py:
    -O3 -lineinfo --expt-relaxed-constexpr, C++20 as torch builds extensions). Cached by the content of csrc/."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    flags = ["-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    h = hashlib.sha256((_INSTANTIATIONS + " ".join(flags)).encode())
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.suffix in (".cuh", ".h"):
            h.update(p.read_bytes())
    cache = pathlib.Path(cache_dir or os.path.join(tempfile.gettempdir(), "hycam_cubins"))
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"kernels_{h.hexdigest()[:16]}_sm{arch}.cubin"
    if out.exists():
        return str(out)
    src = cache / f"kernels_{h.hexdigest()[:16]}.cu"
    src.write_text(_INSTANTIATIONS)
    cmd = [nvcc, *flags, "-cubin",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", f"-I{ROOT / 'csrc'}", f"-I{_torch_include()}",
           str(src), "-o", str(out) + ".tmp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{r.stderr[-3000:]}")
    os.replace(str(out) + ".tmp", out)
    return str(out)


def _demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines() if r.returncode == 0 else []
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_SHORT = [("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("__nv_bfloat16", "bf16"), ("__half", "fp16"),
          ("double", "fp64"), ("float", "fp32")]


def short_name(demangled: str) -> str:
    """'hycam::cam_kernels::cam_forward_kernel<c10::BFloat16, float>(...)' -> 'cam_forward_kernel<bf16,fp32>'."""
    m = re.search(r"(\w+_kernel)<([^()]*)>\(", demangled)
    if not m:
        return demangled
    args = []
    for a in m.group(2).split(","):
        a = a.strip()
        for long_, s in _SHORT:
            if a == long_:
                a = s
                break
        args.append(a)
    while len(args) > 1 and args[-1] == "void":  # a defaulted template argument (no mma type)
        args.pop()
    return f"{m.group(1)}<{','.join(args)}>"


@dataclasses.dataclass
class KernelCode:
    name: str  # short name, e.g. cam_forward_kernel<bf16,fp32>
    arch: int
    regs: int = 0
    static_smem: int = 0  # bytes, without the 1 KB per-block reservation
    local: int = 0  # LOCAL bytes (spills / local arrays)
    stack: int = 0
    global_loads: dict = dataclasses.field(default_factory=dict)  # width bits -> count
    global_stores: dict = dataclasses.field(default_factory=dict)
    hmma: int = 0
    spill_instr: int = 0  # LDL / STL
    generic_loads: int = 0  # LD (generic 64-bit addressing: the compiler could not prove the space)
    generic_stores: int = 0  # ST
    shared_loads: dict = dataclasses.field(default_factory=dict)  # LDS / LDSM opcode -> count
    shared_stores: int = 0  # STS

    def share_128(self) -> float:
        tot = sum(self.global_loads.values()) + sum(self.global_stores.values())
        n = self.global_loads.get(128, 0) + self.global_stores.get(128, 0)
        return n / tot if tot else 0.0


def _width(op: str) -> int:
    m = re.search(r"\.(U8|S8|U16|S16|32|64|128)\b", op)
    if not m:
        return 32
    return {"U8": 8, "S8": 8, "U16": 16, "S16": 16}.get(m.group(1)) or int(m.group(1))


def read_cubins(path: str) -> list[KernelCode]:
    """Resources and SASS statistics of every hycam kernel in a cubin or an .so with embedded cubins."""
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (it ships with the CUDA toolkit and the triton wheel)")
    res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True)
    kernels: dict[tuple[str, int], KernelCode] = {}
    mangled_of = {}
    arch = None
    cur = None
    for line in res.stdout.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and cur and "hycam" in cur:
            mangled_of[cur] = None
            a = arch if arch is not None else _arch_of(path)
            smem = int(m.group(3))
            if a >= 90:  # sm_90 cubins count the 1 KB per-block system reservation in SHARED; sm_80's do not
                smem = max(0, smem - ARCH[90]["smem_reserved_block"])
            k = KernelCode(cur, a, regs=int(m.group(1)), stack=int(m.group(2)), static_smem=smem,
                           local=int(m.group(4)))
            kernels[(cur, a)] = k
    arch = None
    cur = None
    for line in sass.stdout.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = kernels.get((m.group(1), arch if arch is not None else _arch_of(path)))
            continue
        if cur is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base == "LDG" or (base == "LDGSTS"):
            w = _width(op)
            cur.global_loads[w] = cur.global_loads.get(w, 0) + 1
        elif base in ("STG", "RED", "ATOMG"):
            w = _width(op)
            cur.global_stores[w] = cur.global_stores.get(w, 0) + 1
        elif base == "HMMA":
            cur.hmma += 1
        elif base in ("LDL", "STL"):
            cur.spill_instr += 1
        elif base == "LD":
            cur.generic_loads += 1
        elif base == "ST":
            cur.generic_stores += 1
        elif base in ("LDS", "LDSM"):
            cur.shared_loads[op] = cur.shared_loads.get(op, 0) + 1
        elif base == "STS":
            cur.shared_stores += 1
    names = _demangle([k.name for k in kernels.values()])
    out = []
    for k in kernels.values():
        k.name = short_name(names.get(k.name, k.name))
        out.append(k)
    return sorted(out, key=lambda k: (k.name, k.arch))


def _arch_of(path: str) -> int:
    m = re.search(r"sm_?(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else 0


def kernel_code(archs=(80, 90), so: str | None = None) -> tuple[list[KernelCode], str]:
    """Kernel statistics for the given archs and where they came from (the built .so, else nvcc)."""
    so = so or built_extension()
    if so:
        ks = [k for k in read_cubins(so) if k.arch in archs]
        return ks, f"built extension {so}"
    ks = []
    for a in archs:
        ks += read_cubins(compile_kernels(a))
    return ks, "kernel headers compiled with nvcc -O3 -lineinfo (setup.py's device flags)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", help="read this .so/.cubin instead of the built extension or an nvcc compile")
    ap.add_argument("--arch", default="80,90")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    ks, src = kernel_code(archs, args.so)
    print(f"source: {src}")
    print(f"{'kernel':42s} {'sm':>3s} {'regs':>4s} {'smem':>6s} {'local':>5s} {'LDG':>4s} {'STG':>4s} "
          f"{'128b%':>5s} {'STG128':>6s} {'LD/ST.E':>7s} {'HMMA':>4s}")
    for k in ks:
        print(f"{k.name:42s} {k.arch:3d} {k.regs:4d} {k.static_smem:6d} {k.local:5d} "
              f"{sum(k.global_loads.values()):4d} {sum(k.global_stores.values()):4d} {100 * k.share_128():5.1f} "
              f"{k.global_stores.get(128, 0):6d} {k.generic_loads + k.generic_stores:7d} {k.hmma:4d}")


if __name__ == "__main__":
    main()
