"""The GPU instruments that need no GPU: occupancy rules (benchmarks/gpu_occupancy.py) on
configurations with known answers, the kernels' machine code (no local memory, every launch fits
an SM, HMMA in the tensor-core kernels), and the cost model (benchmarks/gpu_model.py): checked on
toy kernels, and its --quick table for today's kernels built so that it cannot rot."""
import json
import os
import shutil
import subprocess

import pytest

from benchmarks import gpu_model, gpu_occupancy as occ

CXX = os.environ.get("CXX", "g++")
needs_cxx = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


# ---- occupancy rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,threads,regs,smem,blocks,limiter", [
    (90, 256, 32, 0, 8, "warps"),            # 8 x 8 warps = 64 warps: 100 %
    (90, 256, 64, 0, 4, "registers"),        # 64 regs x 32 lanes = 2048 per warp -> 32 warps
    (80, 128, 33, 0, 12, "registers"),       # 33 -> 1280 per warp (256-register units) -> 51 warps -> 12 blocks
    (80, 128, 32, 48 * 1024, 3, "shared memory"),  # (48 KB + 1 KB reserved) x 3 <= 164 KB
    (90, 128, 32, 48 * 1024, 4, "shared memory"),  # 228 KB per SM
    (90, 32, 16, 0, 32, "blocks"),           # at most 32 blocks per SM
    (90, 256, 32, 228 * 1024, 0, "shared memory"),  # more than a block may opt in to: cannot launch
])
def test_occupancy_rules(arch, threads, regs, smem, blocks, limiter):
    o = occ.occupancy(arch, threads, regs, 0, smem)
    assert (o.blocks_per_sm, o.limiter) == (blocks, limiter)
    assert o.occupancy == pytest.approx(blocks * threads / 32 / 64)


def test_occupancy_rejects_bad_config():
    with pytest.raises(ValueError, match="threads"):
        occ.occupancy(90, 2048, 32, 0, 0)


# ---- machine code of today's kernels -------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_code():
    so = occ.built_extension()
    if so is None and shutil.which("nvcc") is None:
        pytest.skip("no CUDA build of hycam_ext (hycam_ext/_C*.so without cubins) and no nvcc to compile the "
                    "kernel headers: the machine-code checks need one of them")
    if occ.tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt (binutils) to demangle kernel names")
    ks, src = occ.kernel_code((80, 90), so)
    assert ks, f"no hycam kernels found in {src}"
    return {(k.name, k.arch): k for k in ks}


def test_every_kernel_is_present(kernel_code):
    want = set(gpu_model.CUBIN_NAME.values()) | {"sum_partials_kernel<fp32>", "sum_partials_kernel<fp64>"}
    for arch in (80, 90):
        missing = {n for n in want if (n, arch) not in kernel_code}
        assert not missing, f"sm_{arch}: {missing}"


def test_no_local_memory(kernel_code):
    bad = [(n, a, k.local, k.stack, k.spill_instr) for (n, a), k in kernel_code.items()
           if k.local or k.stack or k.spill_instr]
    assert not bad, f"kernels using local memory (name, arch, LOCAL, STACK, LDL/STL): {bad}"


def test_tensor_core_kernels_use_hmma_and_128_bit_loads(kernel_code):
    for (n, a), k in kernel_code.items():
        if "_tc_kernel" in n:
            assert k.hmma > 0, f"{n} sm_{a}: no HMMA"
            assert k.global_loads.get(128, 0) > 0, f"{n} sm_{a}: no 128-bit global loads ({k.global_loads})"
        elif n in ("cam_backward_kernel<bf16,fp32,bf16>", "cam_backward_kernel<fp16,fp32,fp16>"):
            assert k.hmma > 0, f"{n} sm_{a}: the backward's expand should run on tensor cores"
        else:
            assert k.hmma == 0, f"{n} sm_{a}: unexpected HMMA"


def test_cam_kernels_move_rows_in_16_byte_accesses(kernel_code):
    """The [T, d] streams of both CAM kernels, every dtype: 128-bit global loads in the machine code
    (the scalar tail adds narrower ones)."""
    names = [n for (n, a) in kernel_code if n.startswith(("cam_forward_kernel", "cam_backward_kernel"))]
    assert len(names) >= 16, names  # 2 kernels x 4 dtypes x 2 archs
    for (n, a), k in kernel_code.items():
        if n.startswith(("cam_forward_kernel", "cam_backward_kernel")):
            assert k.global_loads.get(128, 0) > 0, f"{n} sm_{a}: no 128-bit global loads ({k.global_loads})"


@needs_cxx
@pytest.mark.parametrize("shape", ["8192x4096x4x16", "8192x4096x8x64", "4096x1024x16x128", "3x33x1x1"])
def test_every_launch_fits_an_sm(kernel_code, shape):
    """Every launch configuration the host code would accept (dynamic shared memory within the
    device's opt-in limit: the launchers' set_smem rejects the rest with a clear error) has at
    least one resident block per SM on sm_80 and sm_90. Fixed-configuration kernels (the shrink
    family, sum_partials) are checked with their block size and static shared memory."""
    T, d, K, r = shape.split("x")
    exe = gpu_model.build_driver()
    p = subprocess.run([exe, "configs", T, d, K, r, "hard"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    launches = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(launches) == 6
    checked = 0
    types = {2: "<bf16,fp32>", 4: "<fp32,fp32>", 8: "<fp64,fp64>"}
    for L in launches:
        if L["kernel"] == "cam_backward_kernel" and L["elem"] == 2:
            types[2] = "<bf16,fp32,bf16>"  # the backward's wmma element type
        elif L["elem"] == 2:
            types[2] = "<bf16,fp32>"
        if L["lanes_per_row"] == 0:  # no tiling fits: the launchers reject K * r with a clear error
            assert L["smem"] == 0 and L["threads"] == 1, L
            continue
        assert L["smem"] <= 99 * 1024, L  # the budget every sm_80+ GPU can opt in to
        for arch in (80, 90):
            name = L["kernel"] + types[L["elem"]]
            k = kernel_code[(name, arch)]
            o = occ.occupancy(arch, L["threads"], k.regs, k.static_smem, L["smem"])
            assert o.blocks_per_sm >= 1, f"{name} sm_{arch} {L}: cannot fit an SM ({o})"
            assert L["grid"][1] <= 65535 and L["grid"][2] <= 65535
            checked += 1
    if shape in ("8192x4096x4x16", "3x33x1x1"):
        assert checked == 12
    fixed = {"shrink_tc_kernel<bf16>": 128, "shrink_finish_kernel<bf16>": 256, "dx_tc_kernel<bf16>": 128,
             "dA_tc_kernel<bf16>": 128,
             "shrink_kernel<fp64,fp64>": 256, "dx_kernel<fp64,fp64>": 256, "dA_kernel<fp64,fp64>": 256,
             "mix_kernel<fp64,fp64>": 256, "small_reductions_kernel<fp64,fp64>": 256,
             "sum_partials_kernel<fp64>": 256}
    for name, threads in fixed.items():
        for arch in (80, 90):
            k = kernel_code[(name, arch)]
            assert occ.occupancy(arch, threads, k.regs, k.static_smem, 0).blocks_per_sm >= 1, name


# ---- the cost model ------------------------------------------------------------------------------

def _toy_record(kernel, blocks, threads, load, store, mma=0, shfl=0):
    rec = {"kernel": kernel, "group": "toy", "threads": threads, "smem": 0, "blocks": blocks, "mma": mma,
           "shfl": shfl}
    for kind, t in (("load", load), ("store", store)):
        for k in gpu_model.TRAFFIC:
            rec[f"{kind}.{k}"] = t.get(k, 0)
    return rec


def test_model_on_toy_copy_is_dram_bound_at_copy_bandwidth():
    # a coalesced 16-byte copy of n bytes (counts as the emulator gives them, see
    # test_cuda_emulation.py::test_counters_coalesced_16_byte_copy), 132 x 8 blocks of 256 threads
    n = 132 * 8 * 256 * 16 * 64
    t = {"requests": n // 512, "sectors": n // 32, "lines": n // 128, "bytes": n, "request_unique_bytes": n,
         "unique_bytes": n, "unique_sectors": n // 32}
    m = gpu_model.MACHINES["H100 SXM"]
    row = gpu_model.model_kernel(_toy_record("copy", 132 * 8, 256, t, t), m, {}, 0, 0, 0, 0, 1)
    assert row.limiter == "DRAM" and row.sector_eff == 1.0
    assert row.time == pytest.approx(2 * n / m["dram_bw"] + m["launch_s"])


def test_model_on_toy_gather_is_l1_bound():
    # the stride-16 2-byte gather of B (32 sectors, 8 lines per request for 64 useful bytes)
    req = 132 * 64 * 16 * 8 * 100
    load = {"requests": req, "sectors": 32 * req, "lines": 8 * req, "bytes": 64 * req,
            "request_unique_bytes": 64 * req, "unique_bytes": 64 * req, "unique_sectors": 2 * req}
    m = gpu_model.MACHINES["H100 SXM"]
    row = gpu_model.model_kernel(_toy_record("gather", 132 * 64, 256, load, {}), m, {}, 0, 0, 0, 0, 1)
    assert row.limiter == "L1"
    assert row.sector_eff == pytest.approx(64 / (32 * 32))
    assert row.time == pytest.approx(8 * req / (m["sms"] * m["clock"]) + m["launch_s"])


def test_model_small_grid_pays_sm_balance():
    t = {"unique_sectors": 10 ** 6, "sectors": 10 ** 6, "lines": 10 ** 5, "request_unique_bytes": 32 * 10 ** 6}
    m = gpu_model.MACHINES["H100 SXM"]
    full = gpu_model.model_kernel(_toy_record("k", 132 * 4, 256, t, {}), m, {}, 0, 0, 0, 0, 1)
    small = gpu_model.model_kernel(_toy_record("k", 33, 256, t, {}), m, {}, 0, 0, 0, 0, 1)
    # 33 blocks on 132 SMs: a quarter of the SMs work; 8 resident warps per SM: half the memory
    # parallelism that saturates DRAM (MLP_WARPS = 16)
    assert small.sm_balance == pytest.approx(0.25) and full.sm_balance == 1.0
    assert small.mlp == pytest.approx(8 / gpu_model.MLP_WARPS) and full.mlp == 1.0
    assert small.time - m["launch_s"] == pytest.approx((full.time - m["launch_s"]) / (0.25 * small.mlp))


def test_fit_is_exact_for_linear_counts():
    def rec(T):
        r = {"kernel": "k", "group": "g", "threads": 256, "smem": 0, "blocks": 2 * T, "mma": 0, "shfl": 3 * T + 5}
        for kind in ("load", "store"):
            r[kind] = {k: 7 * T + 11 for k in gpu_model.TRAFFIC}
        return r

    (f,) = gpu_model.fit([rec(16)], [rec(32)], 16, 32, 8192)
    assert f["blocks"] == 2 * 8192 and f["shfl"] == 3 * 8192 + 5 and f["load.sectors"] == 7 * 8192 + 11


@needs_cxx
def test_quick_model_table_for_todays_kernels():
    out = gpu_model.run(quick=True)
    table = gpu_model.format_table(out)
    assert table.startswith("MODELLED") and "(modelled)" in table
    mo = out["machines"]["H100 SXM"]
    names = [k["kernel"] for k in mo["kernels"]]
    for n in gpu_model.CUBIN_NAME:
        assert n in names, n
    for k in mo["kernels"]:
        assert k["time"] > 0 and k["dram_bytes"] > 0, k
        assert 0 < k["sector_eff"] <= 1.0, k
        # what each kernel must move is a lower bound of what the emulation saw it touch
        assert k["dram_bytes"] >= 0.99 * k["min_bytes"], k
    by = {k["kernel"]: k for k in mo["kernels"]}
    # facts of today's kernels the model must reproduce: the tensor-core kernels and both CAM
    # kernels stream with full sectors (16-byte row accesses, B staged once per block, the
    # backward's dg / dw partials stored a lane group's row at a time)
    assert by["dx_tc_kernel"]["sector_eff"] > 0.95
    assert by["cam_forward_kernel"]["sector_eff"] > 0.95
    assert by["cam_backward_kernel"]["sector_eff"] > 0.95
    # one pass over [T, d] in the backward: what it moves is its minimum plus the partials, of
    # which the dw partials only for routed pairs (hard routing: 1 in K)
    assert by["cam_backward_kernel"]["dram_bytes"] < 1.15 * by["cam_backward_kernel"]["min_bytes"]
    assert by["cam_backward_kernel"]["smem_wavefronts"] > 0
    # shared memory counted from addresses: the padded tensor-core operands are conflict-free, and
    # the fragment traffic is what the hand count says (4 wavefronts per 16 x 16 operand, 8 per
    # float tile stored)
    bw = by["cam_backward_kernel"]
    assert bw["smem_frag"] == pytest.approx(bw["smem_frag_ideal"]) and bw["smem_frag"] > 0
    assert bw["smem_wavefronts"] < 1.05 * bw["smem_ideal"]
    # the machine code has the widths the model assumes (no charge at a narrower SASS width)
    assert not any("charged" in k["width_st"] or "charged" in k["width_ld"] for k in mo["kernels"]), mo["kernels"]
    assert out["width_mismatches"] == [] or out["width_mismatches"] == ["no machine code"]
    # a range: the pessimistic end is slower than the optimistic one, both above the floor
    pes = out["machines"]["H100 SXM"]["ends"]["pessimistic"]["layer"]
    assert pes["total_s"] > mo["layer"]["total_s"] and pes["vs_floor"] > 1
    # (K + the router's ceil(K / r) slots) * r = 80 outputs: two 64-wide tiles of tensor-core work
    assert by["shrink_tc_kernel"]["tensor_flops"] == pytest.approx(2 * 8192 * 4096 * 128, rel=0.01)
    L = mo["layer"]
    assert L["floor_s"] < L["total_s"] and L["vs_floor"] > 1


def test_compare_plot_of_two_runs(tmp_path):
    """--compare: the layer split into parts for two runs; refuses runs with no machine in common."""
    pytest.importorskip("matplotlib")

    def run(scale, machine="H100 SXM"):
        kernels = [{"kernel": "cam_forward_kernel", "group": "cam_fwd", "time": 1e-4 * scale},
                   {"kernel": "shrink_tc_kernel", "group": "shrink_fwd", "time": 2e-5 * scale}]
        layer = {"gemm_s": 1e-3, "torch_ops_s": {"a": 1e-5}, "total_s": 1e-3 + 1.3e-4 * scale, "floor_s": 1.1e-3}
        return {"shape": dict(T=8, d=8, K=1, r=1, routing="hard"),
                "machines": {machine: {"kernels": kernels, "layer": layer}}}

    parts = gpu_model._parts(run(2.0)["machines"]["H100 SXM"])
    assert parts["CAM kernels (ours)"] == pytest.approx(2e-4) and parts["shrink kernels (ours)"] == pytest.approx(4e-5)
    out = tmp_path / "compare.png"
    gpu_model.plot_compare(run(4.0), run(1.0), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no machine"):
        gpu_model.plot_compare(run(1.0, "A100 SXM"), run(1.0), out)
