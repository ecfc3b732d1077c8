"""A cost model of the CUDA kernels for GPUs we cannot run on: every time it prints is MODELLED.

    python -m benchmarks.gpu_model                 # target shape, H100 SXM and A100, a few minutes
    python -m benchmarks.gpu_model --quick         # H100 only, smaller emulated T (CI)
    python -m benchmarks.gpu_model --out DIR       # also writes DIR/model.json, model.txt, model.png

What is measured (counted exactly, on the CPU): each op's kernels run in the CUDA emulation
(csrc/emulation/cuda_emulation.h, via benchmarks/gpu_model_driver.cpp) with the
launch configurations and the bf16 tensor-core path the launchers choose, at two reduced token
counts T1 < T2 (d, K, r at full size); per launch: warp requests, 32-byte sectors, 128-byte L1
lines, bytes requested, unique bytes touched, tensor-core mma and shuffle instructions per warp,
grid size. Each count is fitted as fixed + per_token * T (exact here: the launch configurations
do not change between T1, T2 and the full T) and evaluated at the full T. Registers and static
shared memory come from the machine code (benchmarks/gpu_occupancy.py).

What is modelled (constants and sources in MACHINES below and in benchmarks/README.md): DRAM
bytes = unique sectors touched x 32 (each sector moved once; L2 reuse assumed perfect within a
kernel, none between kernels); time of one kernel = max(DRAM bytes / copy bandwidth, (L1 lines +
the CAM kernels' analytic shared-memory wavefronts) / (SMs x 1 per clock), shuffles / (SMs x 1 warp
shuffle per clock), FP32 FLOPs / FP32 peak, tensor FLOPs / tensor peak) / SM balance + launch
overhead, where SM balance = (blocks / SMs) /
ceil(blocks / SMs) (the busiest SM sets the time) and the DRAM term is divided by the share of
memory parallelism the resident warps provide (MLP_WARPS). FP32 FLOPs are analytic (formulas in fp32_flops). The
three d x d GEMMs of the shared projection are modelled at the matmul rate only. docs/gpu-cost-model.md
explains the model and its limits.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "gpu_model_driver.cpp"

# Machine constants, each end of a range (ENDS below). H100 SXM: 132 SMs, 50 MB L2, ~3.0 TB/s
# device-to-device copy (a reading of H100s in this workplace, docs/kernels.md, Performance
# targets). Clocks are sustained clocks, not the 1.98 GHz maximum boost (clocks sag under
# sustained load and the power limit): optimistic 1.755 GHz (assumption: what H100 SXMs are
# commonly reported to hold under sustained GEMM load), pessimistic 1.59 GHz (the base clock,
# TechPowerUp GPU database: H100 SXM5 80 GB, base 1590 / boost 1980 MHz). FP32 and tensor peaks
# scale with the clock: 128 FP32 lanes x 2 per SM and clock; dense bf16 989 TFLOP/s at 1.98 GHz
# (NVIDIA H100 datasheet / Hopper whitepaper) = 3784 FLOP per SM and clock. cuBLAS dense bf16 on
# the layer's three [T, d] x [d, d] GEMMs: 750 (optimistic) to 640 TFLOP/s (pessimistic); source:
# readings of cuBLAS on these shapes reported to the project (about 790 at the top, 640-750
# likelier; not measured by us). A100 SXM4 80 GB: 108 SMs, base 1095 / boost 1410 MHz (NVIDIA A100 datasheet,
# TechPowerUp), 64 FP32 lanes per SM, 312 TFLOP/s dense bf16 at 1.41 GHz, 2.04 TB/s HBM2e; its
# sustained clock (1.41 optimistic, 1.275 GHz pessimistic), copy bandwidth (1.7 TB/s, ~83% of
# peak) and matmul rate (250 to 220 TFLOP/s) are assumptions. Per SM and clock on both: one
# 128-byte L1 line (wavefront) per clock (128 B/clk/SM L1 bandwidth, Ampere and Hopper tuning
# guides), one warp shuffle per clock (32 results/clk/SM, CUDA C++ Programming Guide, arithmetic
# instruction throughput, cc 8.0 and 9.0). Launch: 2 us (optimistic) to 4 us (pessimistic) per
# kernel, ours and PyTorch's glue alike (assumption: the gap plus ramp and drain of a
# back-to-back dependent small kernel launched from PyTorch eager). Dependent-load latency of a
# serial loop (small_reductions_kernel: one thread per output walks its split's tokens, four
# loads in flight): 270 clocks (optimistic, an L2 hit) to 300 ns (pessimistic, L2 under load).
# Overlap: optimistic, a kernel's units overlap perfectly (time = the largest term); pessimistic,
# half of the second largest of the DRAM and L1 terms is added (the CAM backward alternates
# global-load phases and shared-memory / mma phases between barriers at 2 blocks per SM).
_BASE = {
    "H100 SXM": dict(arch=90, sms=132, dram_bw=3.0e12, fp32_per_clk_sm=256, tensor_per_clk_sm=989e12 / (132 * 1.98e9),
                     l1_lines_per_clk=1.0, shfl_per_clk=1.0, max_boost=1.98e9),
    "A100 SXM": dict(arch=80, sms=108, dram_bw=1.7e12, fp32_per_clk_sm=128, tensor_per_clk_sm=312e12 / (108 * 1.41e9),
                     l1_lines_per_clk=1.0, shfl_per_clk=1.0, max_boost=1.41e9),
}
ENDS = {
    "optimistic": {"H100 SXM": dict(clock=1.755e9, gemm=750e12, launch_s=2e-6, serial_latency_s=270 / 1.755e9,
                                    overlap=0.0),
                   "A100 SXM": dict(clock=1.41e9, gemm=250e12, launch_s=2e-6, serial_latency_s=270 / 1.41e9,
                                    overlap=0.0)},
    "pessimistic": {"H100 SXM": dict(clock=1.59e9, gemm=640e12, launch_s=4e-6, serial_latency_s=300e-9,
                                     overlap=0.5),
                    "A100 SXM": dict(clock=1.275e9, gemm=220e12, launch_s=4e-6, serial_latency_s=300e-9,
                                     overlap=0.5)},
}


def machine(name: str, end: str = "optimistic") -> dict:
    """The constants of one machine at one end of the range, with the clock-derived peaks."""
    m = dict(_BASE[name], **ENDS[end][name])
    m["fp32"] = m["sms"] * m["fp32_per_clk_sm"] * m["clock"]
    m["tensor"] = m["sms"] * m["tensor_per_clk_sm"] * m["clock"]
    m["end"] = end
    return m


MACHINES = {name: machine(name) for name in _BASE}  # the optimistic end

# Emulated token counts per op group: (T1, T2) full and quick. Counts are exactly linear in T only
# when the launch configuration does not change between T1, T2 and the full T and every tile
# boundary falls on the same place: T multiples of each group's token tile (cam_fwd 64, shrink 64),
# and for the token-split kernels splits of the same size: cam_bwd has S = ceil(T / 512) splits
# (at most 16) of T / S tokens, so T multiples of 512 up to 8192 (the full shape) give splits of 512
# tokens, and its partial buffers grow linearly (pdw, pdg with T, pB with S); shrink_bwd likewise with
# S = ceil(T / 1024) splits (at most 8): T multiples of 1024 up to 8192. Hence also: the model is
# exact up to T = 8192 only.
GROUPS = {
    "shrink_fwd": ((128, 256), (64, 128)),
    "cam_fwd": ((64, 128), (64, 128)),
    "cam_bwd": ((512, 1024), (512, 1024)),
    "shrink_bwd": ((1024, 2048), (1024, 2048)),
}
COUNTERS = ("blocks", "mma", "shfl")
# Resident warps per SM that saturate DRAM (assumption, Little's law): ~3.0 TB/s x ~600 ns latency
# = 1.8 MB in flight, / 132 SMs = 13.6 KB per SM, at ~1 KB in flight per warp (32 lanes x 16 B x 2
# loads) -> ~14, rounded to 16 warps (25% occupancy).
MLP_WARPS = 16
TRAFFIC = ("requests", "sectors", "lines", "bytes", "request_unique_bytes", "unique_bytes", "unique_sectors")
SMEM = ("requests", "wavefronts", "ideal")
WIDTHS = (1, 2, 4, 8, 16)

# cubin name of each emulated launch (bf16 storage, fp32 accumulation)
CUBIN_NAME = {
    "shrink_tc_kernel": "shrink_tc_kernel<bf16>", "shrink_finish_kernel": "shrink_finish_kernel<bf16>",
    "mix_kernel": "mix_kernel<bf16,fp32>",
    "cam_forward_kernel": "cam_forward_kernel<bf16,fp32>",
    "cam_backward_kernel": "cam_backward_kernel<bf16,fp32,bf16>", "sum_dwdg_kernel": "sum_dwdg_kernel<bf16,fp32,bf16>",
    "dp_kernel": "dp_kernel<bf16,fp32>",
    "dx_tc_kernel": "dx_tc_kernel<bf16>", "dA_tc_kernel": "dA_tc_kernel<bf16>",
    "small_reductions_kernel": "small_reductions_kernel<bf16,fp32>",
}


def _cubin_name(kernel: str) -> str:
    return "sum_partials_kernel<fp32>" if kernel.startswith("sum_partials_kernel") else CUBIN_NAME.get(kernel, kernel)


def build_driver(cache_dir: str | None = None) -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"needs a C++20 compiler ({cxx})")
    h = hashlib.sha256()
    for p in [DRIVER, *sorted((ROOT / "csrc").rglob("*.cuh")),
              *sorted((ROOT / "csrc").rglob("*.h"))]:
        h.update(p.read_bytes())
    cache = pathlib.Path(cache_dir or os.path.join(tempfile.gettempdir(), "hycam_model"))
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"gpu_model_driver_{h.hexdigest()[:16]}"
    if not exe.exists():
        cmd = [cxx, "-std=c++20", "-O2", "-DHYCAM_CUDA_EMULATION", f"-I{ROOT / 'csrc'}",
               str(DRIVER), "-o", str(exe) + ".tmp"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"building the model driver failed:\n{r.stderr[-3000:]}")
        os.replace(str(exe) + ".tmp", exe)
    return str(exe)


def run_group(exe, group, T, d, K, r, routing):
    p = subprocess.run([exe, group, str(T), str(d), str(K), str(r), routing], capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{group} T={T}: emulation failed:\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _flat(rec):
    out = {k: rec[k] for k in COUNTERS}
    for kind in ("load", "store"):
        for k in TRAFFIC:
            out[f"{kind}.{k}"] = rec[kind][k]
        for w in WIDTHS:  # global requests by access width (bytes)
            out[f"{kind}_width.{w}"] = rec.get(f"{kind}_width", {}).get(str(w), 0)
    for kind in ("smem_plain", "smem_frag"):  # shared-memory wavefronts counted from addresses
        for k in SMEM:
            out[f"{kind}.{k}"] = rec.get(kind, {}).get(k, 0)
    return out


def fit(runs1, runs2, T1, T2, T):
    """Per launch: every counter c(T) = fixed + per_token * T from the two runs, evaluated at T."""
    out = []
    for a, b in zip(runs1, runs2):
        assert a["kernel"] == b["kernel"]
        fa, fb = _flat(a), _flat(b)
        rec = {"kernel": a["kernel"], "group": a["group"], "threads": a["threads"], "smem": a["smem"]}
        for k in fa:
            slope = (fb[k] - fa[k]) / (T2 - T1)
            rec[k] = max(0.0, fa[k] + slope * (T - T1))
        out.append(rec)
    return out


def fp32_flops(kernel, T, d, K, r, routed):
    """Analytic FP32 work (FLOPs, an FMA = 2) of the CUDA-core kernels: expand 2r per channel and
    specialist, ~12 per sigmoid-based activation (exp + reciprocal + FMAs), a few per element for
    gates and conversions. Approximate by design: it only has to show whether FP32 can limit."""
    KR = K * r
    if kernel == "cam_forward_kernel":
        return T * d * (routed * (2 * r + 14) + 18)
    if kernel == "cam_backward_kernel":  # activations of all K (bf16: the expand is on tensor
        return T * d * (K * 16 + routed * (4 * r + 10) + 24)  # cores), dw and dB / db of the routed
    if kernel in ("mix_kernel", "dp_kernel"):
        return T * KR * 2 * r
    if kernel == "small_reductions_kernel":
        return T * (2 * KR + 2 * K * r * r)
    return 0.0


def _expected_items(rows, K, routed, per_item=4):
    """Expected phase-1b items of a backward tile: sum over k of ceil(tokens routed to k / per_item),
    the tokens of a tile routed uniformly at random (hard routing: Binomial(rows, 1 / K) per k)
    or to every k (soft routing)."""
    if routed >= K:
        return K * math.ceil(rows / per_item)
    p = 1.0 / K
    return K * sum(math.comb(rows, x) * p ** x * (1 - p) ** (rows - x) * math.ceil(x / per_item)
                   for x in range(rows + 1))


def _mma_a_loads(rows16, K, nf, nwarps=8):
    """w-operand loads per tile of the backward's mma (r <= 16): each warp takes a contiguous run
    of the (mi, k, n) tiles and loads the w tile once per (mi, k) in its run."""
    nfrag = rows16 // 16 * K * nf
    per = math.ceil(nfrag / nwarps)
    return sum(len({f // nf for f in range(w * per, min(nfrag, (w + 1) * per))}) for w in range(nwarps))


def smem_wavefronts(kernel, T, d, K, r, routed, lpr):
    """Analytic shared-memory wavefronts (128 bytes per SM and clock) of the CAM kernels' main loops
    for bf16 (V = 8 channels per lane, lane groups of lpr lanes, 256 / lpr tokens per block step),
    counted from the code in csrc/cam/cam_kernels.cuh, not measured. Rules (bank model of sm_80 /
    sm_90: 32 banks of 4 bytes, 128 bytes per wavefront): a warp access costs its distinct bytes /
    128 when its lanes spread over all banks (a 16-byte load of 512 contiguous bytes: 4; the
    backward's x order makes every per-lane access of du and B part of a contiguous stretch);
    lanes reading the same address share it (a broadcast of w: 1); a wmma load of a 16 x 16 bf16
    operand is 4, a store of a 16 x 16 float tile 8. Hard routing assumes uniformly random routes
    for the phase-1b items (the emulation's routes are balanced: slightly fewer). The other
    kernels' shared memory is not modelled (0)."""
    V, R1 = 8, r + 1
    units = T * d / (32 * V)  # warp instructions of a per-lane loop over all (token, lane) pairs
    jt = lpr * V
    stage = K * r * jt / 32 * 2  # per block: B transposed into shared memory (2-way conflicts)
    if kernel == "cam_forward_kernel":  # per routed k: bias + r B loads (16 B), r / 4 w broadcasts
        blocks = math.ceil(T / 64) * math.ceil(d / jt)
        return units * routed * (4 * (r + 1) + math.ceil(r / 4)) + blocks * stage
    if kernel == "cam_backward_kernel":  # tensor-core expand (bf16, jt a multiple of 16)
        rows = 256 // lpr
        rows16, r16 = math.ceil(rows / 16) * 16, math.ceil(r / 16) * 16
        tiles = math.ceil(T / rows) * math.ceil(d / jt)
        nf = jt // 16
        frags = rows16 // 16 * K * nf
        a_loads = _mma_a_loads(rows16, K, nf) if r16 == 16 else frags * r16 / 16
        mma = tiles * (frags * (8 + 4 * r16 / 16) + 4 * a_loads)  # u stores, B operands, w operands
        wh = tiles * rows16 * K * r16 / 32  # w converted to bf16 (2-byte stores)
        # phase 1: u (two 16-byte loads per lane: 8) + bias (two 8-byte loads, shared by the lane
        # groups of a warp) for every k; du stored (8) for the routed ones
        expand = units * K * (8 + 2 * max(1, lpr * 8 / 128)) + units * routed * 8
        # phase 1b: du read back (8 per routed token row); per item (up to 4 tokens of one k) r
        # B rows of two 8-byte loads per lane: r * lpr / 8
        dw = units * routed * 8 + tiles * _expected_items(rows, K, routed) * r * lpr / 8
        # phase 2, per routed token and 32 threads (64 columns of one k): two du loads per chunk of
        # 8 rank indices and r / 4 w broadcasts; accumulators loaded and stored once per tile
        phase2 = (T * d / 64 * routed * (2 * math.ceil(r / 8) + math.ceil(r / 4))
                  + T * d * K * R1 * 2 / (32 * rows))
        blocks = math.ceil(d / jt) * min(16, max(1, math.ceil(T / 512)))
        # the sums of dz (z_bias's gradient): each lane loads and stores its 8 float sums per
        # token (8 + 8), then per block one pass over the rows x jt sums (4-byte loads by 256 threads)
        zsum = units * 16 + blocks * rows * jt * 4 / 128
        return mma + wh + expand + dw + phase2 + zsum + blocks * stage
    return 0.0


def min_bytes(kernel, T, d, K, r, e=2):
    """The minimum bytes of what each kernel must do (each input read once, each output written
    once); partial buffers and their reductions are avoidable (0)."""
    KR = K * r
    return {
        "shrink_tc_kernel": T * d * e + KR * d * e,
        "shrink_finish_kernel": T * KR * e,
        "mix_kernel": 2 * T * KR * e,
        "cam_forward_kernel": 3 * T * d * e + T * KR * e + K * d * r * e,
        "cam_backward_kernel": 5 * T * d * e + T * KR * e + K * d * r * e + T * K * (r + 1) * e + K * d * (r + 1) * e,
        "dp_kernel": T * KR * e,
        "dx_tc_kernel": T * d * e + T * KR * e + KR * d * e,
        "dA_tc_kernel": T * d * e + KR * d * e,
        "small_reductions_kernel": 2 * T * KR * e,
    }.get(kernel, 0)


@dataclasses.dataclass
class Row:
    kernel: str
    group: str
    blocks: float
    threads: int
    min_bytes: float
    dram_bytes: float
    sector_eff: float
    occupancy: float
    blocks_per_sm: int
    waves: int
    sm_balance: float
    mlp: float
    fp32_flops: float
    tensor_flops: float
    shfl: float
    l1_lines: float
    smem_wavefronts: float  # counted from addresses in the emulation (plain accesses + fragments)
    smem_ideal: float  # the same accesses without bank conflicts
    smem_frag: float  # of which tensor-core fragment loads / stores
    smem_frag_ideal: float
    smem_hand: float  # the hand count of smem_wavefronts() (CAM kernels), for comparison
    width_ld: str  # widest global load / store: emulated bytes -> SASS bits ("16B/128" ...)
    width_st: str
    t_latency: float  # serial-loop latency (small_reductions_kernel)
    t_dram: float
    t_l1: float
    t_shfl: float
    t_fp32: float
    t_tensor: float
    limiter: str
    time: float  # modelled seconds


def model_kernel(rec, m, code, T, d, K, r, routed):
    from benchmarks import gpu_occupancy as occ

    name = rec["kernel"]
    kc = code.get((_cubin_name(name), m["arch"]))
    regs = kc.regs if kc else 0
    static_smem = kc.static_smem if kc else 0
    o = occ.occupancy(m["arch"], rec["threads"], max(regs, 1), static_smem, int(rec["smem"]))
    blocks = max(1.0, round(rec["blocks"]))
    slots = m["sms"] * o.blocks_per_sm
    waves = max(1, math.ceil(blocks / slots)) if slots else 0
    # SM balance: the SM with the most blocks sets the time of every per-SM resource (wave
    # quantisation, tails, grids smaller than the GPU)
    per_sm = math.ceil(blocks / m["sms"])
    bal = (blocks / m["sms"]) / per_sm
    # memory parallelism: DRAM bandwidth needs ~MLP_WARPS resident warps per SM (assumption, see
    # MLP_WARPS); fewer resident warps get a proportional share of it
    warps_resident = min(per_sm, o.blocks_per_sm) * math.ceil(rec["threads"] / 32)
    mlp = min(1.0, warps_resident / MLP_WARPS)
    dram = 32 * (rec["load.unique_sectors"] + rec["store.unique_sectors"])
    sectors = rec["load.sectors"] + rec["store.sectors"]
    used = rec["load.request_unique_bytes"] + rec["store.request_unique_bytes"]
    lines = rec["load.lines"] + rec["store.lines"]
    K = rec.get("K", K)  # the shrink's kernels also carry the router's slots
    f32 = fp32_flops(name, T, d, K, r, routed)
    tf = rec["mma"] * 2 * 16 ** 3
    # the global access widths the machine code has: where the emulated (source) width of a kernel's
    # widest loads or stores is missing from its SASS, those requests are charged at the SASS's
    # widest width (lines x emulated / SASS width for their share of the requests)
    width = {}
    for kind in ("load", "store"):
        emu = max((w for w in WIDTHS if rec.get(f"{kind}_width.{w}", 0) > 0), default=0)
        sass_bits = max((b for b, n in ((kc.global_loads if kind == "load" else kc.global_stores) if kc else {}).items()
                         if n), default=0)
        width[kind] = f"{emu}B/{sass_bits or '-'}"
        if kc and emu and sass_bits and sass_bits < 8 * emu:
            share = rec[f"{kind}_width.{emu}"] / max(1.0, rec[f"{kind}.requests"])
            lines += rec[f"{kind}.lines"] * share * (8 * emu / sass_bits - 1)
            width[kind] += " (charged at SASS width)"
    smem_plain, smem_frag = rec.get("smem_plain.wavefronts", 0.0), rec.get("smem_frag.wavefronts", 0.0)
    smem = smem_plain + smem_frag
    ideal = rec.get("smem_plain.ideal", 0.0) + rec.get("smem_frag.ideal", 0.0)
    hand = smem_wavefronts(name, T, d, K, r, routed, rec.get("lanes_per_row") or 32)
    parts = {
        "DRAM": dram / m["dram_bw"],
        # global lines and shared-memory wavefronts share the L1/shared-memory data path
        "L1": (lines + smem) / (m["sms"] * m["clock"] * m["l1_lines_per_clk"]),
        "shuffle": rec["shfl"] / (m["sms"] * m["clock"] * m["shfl_per_clk"]),
        "FP32": f32 / m["fp32"],
        "tensor": tf / m["tensor"],
    }
    parts["DRAM"] /= mlp
    lim = max(parts, key=parts.get)
    busy = parts[lim]
    if lim in ("DRAM", "L1"):  # imperfect overlap of the memory phases (pessimistic end)
        busy += m.get("overlap", 0.0) * parts["L1" if lim == "DRAM" else "DRAM"]
    t_lat = serial_latency(name, T, K, r, m)
    t = max(busy / bal, t_lat) + m["launch_s"] if o.blocks_per_sm > 0 else float("inf")
    note = lim if busy / bal >= t_lat else "latency (serial loop)"
    if lim == "DRAM" and mlp < 1:
        note += f" ({warps_resident} warps/SM: {mlp:.0%} of bandwidth)"
    if bal < 0.9:
        note += f", SM balance {bal:.0%}"
    return Row(name, rec["group"], blocks, rec["threads"], min_bytes(name, T, d, K, r), dram,
               used / (32 * sectors) if sectors else 1.0, o.occupancy, o.blocks_per_sm, waves, bal, mlp, f32, tf,
               rec["shfl"], lines, smem, ideal, smem_frag, rec.get("smem_frag.ideal", 0.0), hand, width["load"],
               width["store"], t_lat, parts["DRAM"], parts["L1"], parts["shuffle"], parts["FP32"], parts["tensor"],
               note, t)


def serial_latency(kernel, T, K, r, m):
    """Latency floor of a kernel whose threads walk a serial loop: small_reductions_kernel, one
    thread per output over its split's tokens (S = min(64, ceil(T / 128)) splits,
    shrink_backward_config), four loads in flight per latency wait (the loop unrolled by four):
    tokens / 4 x the dependent-load latency."""
    if kernel != "small_reductions_kernel":
        return 0.0
    S = max(1, min(64, math.ceil(T / 128)))
    return math.ceil(T / S) / 4 * m["serial_latency_s"]


# PyTorch glue launches of one layer, forward + backward (the last count of
# benchmarks/glue_launches.py: routing incl. Gumbel sampling, the router / shrink weight
# concatenations, gradient buffers, casts); used when the count cannot run (no loadable hycam_ext).
GLUE_LAUNCHES = 15


def glue_launches():
    try:
        from benchmarks import glue_launches as gl

        return gl.count()["glue_launches"], "counted by benchmarks/glue_launches.py"
    except Exception as exc:  # no torch / no kernels: the last count
        return GLUE_LAUNCHES, f"last count ({type(exc).__name__})"


def layer(rows, m, T, d, K, glue=GLUE_LAUNCHES):
    """The whole HyCAM layer (HyCAM.forward(x, h) + backward, bf16): our kernels as modelled, the
    three d x d GEMMs at the matmul rate, and PyTorch's glue (every launch counted) at its
    launch latency (it moves few bytes: [T, K] routing tensors, weight concatenations)."""
    gemm = 3 * 2 * T * d * d / m["gemm"]
    torch_ops = {  # bytes, launches
        # the router's x @ W_r^T, dl @ W_r and dl^T @ x ride on the shrink's GEMMs (ops.projections:
        # extra specialist slots, modelled in the shrink kernels); the shared projection's dx GEMM
        # accumulates into the shrink's dx in its epilogue (beta = 1), inside a compute-bound GEMM:
        # counted at the matmul rate only; db_s: inside the CAM backward (z_bias)
        f"PyTorch glue ({glue} launches: routing, concatenations, buffers, casts)": (0, glue),
    }
    torch_t = {k: b / m["dram_bw"] + n * m["launch_s"] for k, (b, n) in torch_ops.items()}
    ours = sum(rw.time for rw in rows)
    floor = gemm + sum(rw.min_bytes for rw in rows) / m["dram_bw"]
    total = ours + gemm + sum(torch_t.values())
    return dict(gemm_s=gemm, ours_s=ours, torch_ops_s=torch_t, total_s=total, floor_s=floor,
                vs_floor=total / floor, end=m.get("end", "optimistic"))


def shrink_slots(K, r):
    """Specialist slots of the grouped shrink: K specialists plus the router's ceil(K / r) slots
    (ops.projections)."""
    return K + -(-K // r)


def run(quick=False, T=8192, d=4096, K=4, r=16, routing="hard", machines=None, jobs=2, log=print):
    from benchmarks import gpu_occupancy as occ

    machines = machines or (["H100 SXM"] if quick else list(MACHINES))
    exe = build_driver()
    tasks = []
    for g, (full, qk) in GROUPS.items():
        T1, T2 = qk if quick else full
        tasks += [(g, T1), (g, T2)]
    res = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(run_group, exe, g, t, d, shrink_slots(K, r) if g.startswith("shrink") else K, r,
                          routing): (g, t) for g, t in tasks}
        for f in concurrent.futures.as_completed(futs):
            res[futs[f]] = f.result()
    fitted = []
    for g, (full, qk) in GROUPS.items():
        T1, T2 = qk if quick else full
        a, b = res[(g, T1)], res[(g, T2)]
        fitted += fit(a, b, T1, T2, T)
    # the CAM kernels' lane-group width at the full shape (bf16), for the shared-memory term
    lpr = {c["kernel"]: c["lanes_per_row"] for c in run_group(exe, "configs", T, d, K, r, routing) if c["elem"] == 2}
    for rec in fitted:
        rec["lanes_per_row"] = lpr.get(rec["kernel"])
        rec["K"] = shrink_slots(K, r) if rec["group"].startswith("shrink") else K
    archs = sorted({MACHINES[n]["arch"] for n in machines})
    try:
        ks, code_src = occ.kernel_code(tuple(archs))
        code = {(k.name, k.arch): k for k in ks}
    except Exception as exc:  # no nvcc and no CUDA build: occupancy from threads and smem only
        code, code_src = {}, f"none ({exc}); occupancy ignores registers and static shared memory"
    routed = 1 if routing == "hard" else K
    glue, glue_src = glue_launches()
    out = {"shape": dict(T=T, d=d, K=K, r=r, dtype="bf16", routing=routing), "quick": quick,
           "emulated_T": {g: (qk if quick else full) for g, (full, qk) in GROUPS.items()},
           "machine_code": code_src, "glue_launches": glue, "glue_source": glue_src, "machines": {},
           "width_mismatches": width_mismatches(fitted, code, archs) if code else ["no machine code"],
           "label": "modelled"}
    for name in machines:
        ends = {}
        for end in ENDS:
            m = machine(name, end)
            rows = [model_kernel(rec, m, code, T, d, K, r, routed) for rec in fitted]
            ends[end] = {"constants": m, "kernels": [dataclasses.asdict(rw) for rw in rows],
                         "layer": layer(rows, m, T, d, K, glue)}
        # "kernels" / "layer" / "constants": the optimistic end (what earlier runs reported)
        out["machines"][name] = dict(ends["optimistic"], ends=ends)
    return out


def emulated_widths(T=512, d=4096, K=4, r=16, routing="hard"):
    """The emulated kernels' counters (bf16, one run per op group at a small T, with the group's
    token tile) as flat records: what width_mismatches compares with the machine code."""
    exe = build_driver()
    recs = []
    for g in GROUPS:
        Tg = max(T, GROUPS[g][1][0])
        for rec in run_group(exe, g, Tg, d, shrink_slots(K, r) if g.startswith("shrink") else K, r, routing):
            recs.append(dict(_flat(rec), kernel=rec["kernel"], group=rec["group"]))
    return recs


def width_mismatches(recs, code, archs):
    """Kernels whose widest emulated global load or store width (the model's assumption for its
    streams) does not appear in their SASS, per arch: ["kernel sm_XX: ...", ...]."""
    out = []
    for rec in recs:
        for a in archs:
            kc = code.get((_cubin_name(rec["kernel"]), a))
            if kc is None:
                out.append(f"{rec['kernel']} sm_{a}: not in the machine code")
                continue
            for kind, have in (("load", kc.global_loads), ("store", kc.global_stores)):
                emu = max((w for w in WIDTHS if rec.get(f"{kind}_width.{w}", 0) > 0), default=0)
                if emu and not have.get(8 * emu, 0):
                    out.append(f"{rec['kernel']} sm_{a}: emulated {8 * emu}-bit {kind}s, SASS has "
                               f"{dict(sorted(have.items()))} (bits: count)")
    return sorted(set(out))


def format_table(out) -> str:
    s = out["shape"]
    lines = [f"MODELLED (not measured) GPU times, bf16 T={s['T']} d={s['d']} K={s['K']} r={s['r']} "
             f"{s['routing']} routing; counts from the CPU emulation at T={out['emulated_T']} scaled to T; "
             f"machine code: {out['machine_code']}; PyTorch glue: {out.get('glue_launches')} launches "
             f"({out.get('glue_source', '')})"]
    wm = out.get("width_mismatches")
    lines.append("global access widths, emulation vs SASS: " + ("agree for every kernel" if not wm else
                                                                  "DISAGREE: " + "; ".join(wm)))
    for name, mo in out["machines"].items():
        ends = mo.get("ends") or {"optimistic": mo}
        opt, pes = ends["optimistic"], ends.get("pessimistic", ends["optimistic"])
        for end, e in ends.items():
            c = e["constants"]
            lines.append(f"{name} {end}: clock {c['clock'] / 1e9:.3f} GHz "
                         f"(max boost {c.get('max_boost', 0) / 1e9:.2f}), "
                         f"cuBLAS {c['gemm'] / 1e12:.0f} TFLOP/s, copy {c['dram_bw'] / 1e12:.1f} TB/s, "
                         f"launch {c['launch_s'] * 1e6:.0f} us, serial-load latency "
                         f"{c.get('serial_latency_s', 0) * 1e9:.0f} ns, overlap penalty {c.get('overlap', 0):.0%}")
        lines.append("")
        lines.append(f"== {name} (modelled) ==")
        lines.append(f"{'kernel':28s} {'blocks':>7s} {'occ':>4s} {'min MB':>7s} {'DRAM MB':>8s} "
                     f"{'sect.eff':>8s} {'ld B/SASS':>9s} {'st B/SASS':>9s} {'L1 Mlines':>9s} {'smem Mwf':>8s} "
                     f"{'conf.':>5s} {'frag Mwf':>8s} {'hand Mwf':>8s} {'shfl M':>7s} {'TC GF':>6s} "
                     f"{'opt us':>7s} {'pess us':>7s} {'floor us':>8s}  limiter")
        for k, kp in zip(opt["kernels"], pes["kernels"]):
            floor_us = k["min_bytes"] / opt["constants"]["dram_bw"] * 1e6
            ideal = k.get("smem_ideal", 0)
            conf = k["smem_wavefronts"] / ideal if ideal else 1.0
            lines.append(
                f"{k['kernel'][:28]:28s} {k['blocks']:7.0f} {k['occupancy']:4.0%} "
                f"{k['min_bytes'] / 1e6:7.1f} {k['dram_bytes'] / 1e6:8.1f} {k['sector_eff']:8.1%} "
                f"{k.get('width_ld', '?')[:9]:>9s} {k.get('width_st', '?')[:9]:>9s} "
                f"{k['l1_lines'] / 1e6:9.2f} {k['smem_wavefronts'] / 1e6:8.2f} {conf:5.2f} "
                f"{k.get('smem_frag', 0) / 1e6:8.2f} {k.get('smem_hand', 0) / 1e6:8.2f} {k['shfl'] / 1e6:7.2f} "
                f"{k['tensor_flops'] / 1e9:6.1f} {k['time'] * 1e6:7.1f} {kp['time'] * 1e6:7.1f} {floor_us:8.1f}  "
                f"{k['limiter']}")
        Lo, Lp = opt["layer"], pes["layer"]
        w = 136
        lines.append(f"{'our kernels (modelled)':28s} {Lo['ours_s'] * 1e6:>{w}.1f} {Lp['ours_s'] * 1e6:7.1f}")
        lines.append(f"{'3 d x d GEMMs at cuBLAS rate':28s} {Lo['gemm_s'] * 1e6:>{w}.1f} {Lp['gemm_s'] * 1e6:7.1f}")
        for (k, v), vp in zip(Lo["torch_ops_s"].items(), Lp["torch_ops_s"].values()):
            lines.append(f"  {k[:w + 24]:{w + 26}s} {v * 1e6:7.1f} {vp * 1e6:7.1f}")
        lines.append(f"LAYER fwd+bwd (modelled): {Lo['total_s'] * 1e3:.2f} ms (optimistic) to "
                     f"{Lp['total_s'] * 1e3:.2f} ms (pessimistic); floor (GEMMs at the same end's cuBLAS rate + "
                     f"minimum bytes at {opt['constants']['dram_bw'] / 1e12:.1f} TB/s): {Lo['floor_s'] * 1e3:.2f} / "
                     f"{Lp['floor_s'] * 1e3:.2f} ms; "
                     f"{Lo['vs_floor']:.2f}x to {Lp['vs_floor']:.2f}x the floor (target <= 1.2x measured, "
                     f"<= 1.3x modelled at the pessimistic end)")
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["machines"])
    fig, axes = plt.subplots(1, len(names), figsize=(8 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        mo = out["machines"][name]
        ks = mo["kernels"]
        labels = [k["kernel"].replace("_kernel", "") for k in ks] + ["3 GEMMs", "torch ops", "LAYER"]
        L = mo["layer"]
        model = [k["time"] * 1e6 for k in ks] + [L["gemm_s"] * 1e6, sum(L["torch_ops_s"].values()) * 1e6,
                                                  L["total_s"] * 1e6]
        floor = [k["min_bytes"] / mo["constants"]["dram_bw"] * 1e6 for k in ks] + [L["gemm_s"] * 1e6, 0,
                                                                                  L["floor_s"] * 1e6]
        y = range(len(labels))
        ax.barh([i + 0.2 for i in y], model, height=0.4, label="modelled time")
        ax.barh([i - 0.2 for i in y], floor, height=0.4, label="floor (minimum bytes / GEMM roofline)")
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("microseconds (MODELLED, not measured)")
        s = out["shape"]
        ax.set_title(f"{name}: MODELLED, bf16 T={s['T']} d={s['d']} K={s['K']} r={s['r']} {s['routing']}",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parts(mo):
    """A modelled layer split into what a reader compares across versions (seconds)."""
    L, ks = mo["layer"], mo["kernels"]
    cam = sum(k["time"] for k in ks if k["group"].startswith("cam"))
    shrink = sum(k["time"] for k in ks if k["group"].startswith("shrink"))
    return {"CAM kernels (ours)": cam, "shrink kernels (ours)": shrink,
            "3 d x d GEMMs": L["gemm_s"], "other torch ops": sum(L["torch_ops_s"].values()),
            "LAYER": L["total_s"], "floor": L["floor_s"]}


def plot_compare(before, after, path, labels=("before", "after")):
    """Grouped bars of two model runs (model.json dicts) per machine: where the layer's modelled
    time goes, against its floor. Every bar is MODELLED."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in after["machines"] if n in before["machines"]]
    if not names:
        raise ValueError("the two model runs share no machine")
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        pb, pa = _parts(before["machines"][name]), _parts(after["machines"][name])
        keys = list(pa)
        y = range(len(keys))
        ax.barh([i + 0.2 for i in y], [pb[k] * 1e3 for k in keys], height=0.4, label=labels[0])
        ax.barh([i - 0.2 for i in y], [pa[k] * 1e3 for k in keys], height=0.4, label=labels[1])
        ax.set_yticks(list(y))
        ax.set_yticklabels(keys, fontsize=8)
        ax.set_xlabel("milliseconds (MODELLED, not measured)")
        s = after["shape"]
        ax.set_title(f"{name}: MODELLED, bf16 T={s['T']} d={s['d']} K={s['K']} r={s['r']} {s['routing']}\n"
                     f"layer {pb['LAYER'] * 1e3:.2f} -> {pa['LAYER'] * 1e3:.2f} ms "
                     f"(floor {pa['floor'] * 1e3:.2f} ms)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="H100 only, smaller emulated T (CI)")
    ap.add_argument("--shape", default="8192x4096x4x16", help="T x d x K x r (default: the target shape)")
    ap.add_argument("--routing", choices=("hard", "soft"), default="hard")
    ap.add_argument("--jobs", type=int, default=2, help="emulation processes in parallel")
    ap.add_argument("--out", help="directory for model.json, model.txt, model.png")
    ap.add_argument("--compare", metavar="MODEL_JSON",
                    help="an earlier run's model.json: also write compare.png (earlier vs this run) to --out")
    args = ap.parse_args(argv)
    if args.compare and not args.out:
        ap.error("--compare writes compare.png into --out: give --out too")
    T, d, K, r = (int(v) for v in args.shape.lower().split("x"))
    out = run(quick=args.quick, T=T, d=d, K=K, r=r, routing=args.routing, jobs=args.jobs)
    out["command"] = "python -m benchmarks.gpu_model " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(out)
    print(table)
    if args.out:
        o = pathlib.Path(args.out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "model.json").write_text(json.dumps(out, indent=1))
        (o / "model.txt").write_text(table + "\n")
        plot(out, o / "model.png")
        if args.compare:
            plot_compare(json.loads(pathlib.Path(args.compare).read_text()), out, o / "compare.png",
                         labels=(str(args.compare), "this run"))
        print(f"wrote {o}/model.json, model.txt, model.png")


if __name__ == "__main__":
    main()
