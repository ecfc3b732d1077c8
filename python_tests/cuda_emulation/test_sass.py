"""The machine code of the CAM kernels (SASS of the built extension, cuobjdump), sm_80 and sm_90.

What the emulation cannot see, checked on the real build: every [T, d] stream of the CAM forward
and backward is stored with 128-bit instructions (STG.E.128, the explicit st.global.v4.b32 of
cuda::st), the tensor-core operands of the 16-bit backward are loaded through shared space
(LDSM, no generic LD.E), and the kernels keep their register budget without spills. Skipped only
when there is neither a CUDA build of hycam_ext nor nvcc (the kernel headers compiled with the
extension's flags stand in for the build), or no cuobjdump."""
import shutil

import pytest

from benchmarks import gpu_model, gpu_occupancy as occ

CAM16 = ["cam_forward_kernel<bf16,fp32>", "cam_forward_kernel<fp16,fp32>",
         "cam_backward_kernel<bf16,fp32,bf16>", "cam_backward_kernel<fp16,fp32,fp16>"]
CAM_WIDE = ["cam_forward_kernel<fp32,fp32>", "cam_forward_kernel<fp64,fp64>",
            "cam_backward_kernel<fp32,fp32>", "cam_backward_kernel<fp64,fp64>"]
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def code():
    so = occ.built_extension()
    if so is None and shutil.which("nvcc") is None:
        pytest.skip("no CUDA build of hycam_ext (hycam_ext/_C*.so holds no cubin) and no nvcc: no machine code to read")
    if occ.tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt (binutils) to demangle kernel names")
    ks, src = occ.kernel_code(ARCHS, so)
    by = {(k.name, k.arch): k for k in ks}
    print(f"\nmachine code: {src}")
    print(f"{'kernel':38s} {'sm':>3s} {'regs':>4s} {'spill':>5s} {'STG.128':>7s} {'STG other':>9s} "
          f"{'LD/ST.E':>7s} {'LDSM':>4s} {'HMMA':>4s}")
    for n in CAM16 + CAM_WIDE:
        for a in ARCHS:
            k = by.get((n, a))
            if k is None:
                continue
            ldsm = sum(v for op, v in k.shared_loads.items() if op.startswith("LDSM"))
            other = sum(v for w, v in k.global_stores.items() if w != 128)
            print(f"{n:38s} {a:3d} {k.regs:4d} {k.local + k.spill_instr:5d} {k.global_stores.get(128, 0):7d} "
                  f"{other:9d} {k.generic_loads + k.generic_stores:7d} {ldsm:4d} {k.hmma:4d}")
    return by


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CAM16 + CAM_WIDE)
def test_cam_streams_store_128_bit(code, name, arch):
    """out (forward), d_main and dz (backward): one STG.E.128 per vector store site at least."""
    k = code.get((name, arch))
    assert k is not None, f"{name} sm_{arch} not in the machine code"
    want = 1 if name.startswith("cam_forward") else 2
    assert k.global_stores.get(128, 0) >= want, f"{name} sm_{arch}: global stores by width {k.global_stores}"
    assert k.global_loads.get(128, 0) > 0, f"{name} sm_{arch}: global loads by width {k.global_loads}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CAM16)
def test_16_bit_cam_kernels_have_no_generic_accesses(code, name, arch):
    """No LD.E / ST.E (generic addressing): shared memory through LDS / LDSM / STS, global through
    LDG / STG."""
    k = code[(name, arch)]
    assert k.generic_loads == 0, f"{name} sm_{arch}: {k.generic_loads} generic LD"
    assert k.generic_stores == 0, f"{name} sm_{arch}: {k.generic_stores} generic ST"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CAM16[2:])
def test_backward_fragments_load_through_ldsm(code, name, arch):
    k = code[(name, arch)]
    assert k.hmma > 0, f"{name} sm_{arch}: no HMMA"
    assert any(op.startswith("LDSM") for op in k.shared_loads), f"{name} sm_{arch}: shared loads {k.shared_loads}"


@pytest.mark.parametrize("arch", ARCHS)
def test_cam_kernels_registers_and_no_spills(code, arch):
    """__launch_bounds__(256, 2) of the backward: at most 128 registers; no kernel spills."""
    for name in CAM16 + CAM_WIDE:
        k = code[(name, arch)]
        assert k.local == 0 and k.stack == 0 and k.spill_instr == 0, (name, arch, k.local, k.stack, k.spill_instr)
        if name.startswith("cam_backward"):
            assert k.regs <= 128, (name, arch, k.regs)


def test_model_store_widths_agree_with_sass(code):
    """The cost model's widths (the emulation's global accesses per kernel) must exist in the
    machine code; a disagreement (e.g. 16-byte stores emulated, none in the SASS) fails here."""
    recs = gpu_model.emulated_widths(T=512, d=4096, K=4, r=16)
    problems = gpu_model.width_mismatches(recs, code, ARCHS)
    assert not problems, "\n".join(problems)
