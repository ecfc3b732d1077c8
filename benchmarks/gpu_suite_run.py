"""The measuring half of benchmarks/gpu_suite.sh (the first GPU run), and its report.

    python -m benchmarks.gpu_suite_run case              # one layer fwd+bwd at the design shape (for ncu)
    python -m benchmarks.gpu_suite_run measure OUT_DIR   # time it; write OUT_DIR/measured.json
    python -m benchmarks.gpu_suite_run report OUT_DIR    # OUT_DIR/results.json: measured beside modelled

measure: on the GPU, bf16, T=8192 d=4096 K=4 r=16 hard routing (SPEC section 5), CUDA events,
L2 flushed before each repetition, variants interleaved (benchmarks/harness.py): the copy rate
(torch copy_ of 256 MiB, bytes read + written), the cuBLAS rate of the layer's GEMM shape
([T, d] x [d, d]), the HyCAM layer forward+backward and each of our ops on their own, each as a
median with its quartiles. report: results.json with the device, the self-test and sanitizer
outcome (SUMMARY.txt), every measurement with the cost model's prediction beside it (the
optimistic and pessimistic ends of benchmarks/results/<model dir>/model.json, MODELLED), the
measured floor (the three d x d GEMMs at the measured cuBLAS rate + the minimum bytes at the
measured copy rate) and, where Nsight Compute ran (ncu.csv), its per-kernel metrics beside the
model's counts."""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmarks" / "results" / "model-glue-2026-12-07" / "model.json"
SHAPE = dict(T=8192, d=4096, K=4, r=16)
# ncu metrics (Nsight Compute names) -> the cost model's field they are compared with
NCU_METRICS = {
    "gpu__time_duration.sum": "time",
    "dram__bytes_read.sum": "dram_bytes",
    "dram__bytes_write.sum": "dram_bytes",
    "lts__t_sectors.sum": None,
    "l1tex__t_requests_pipe_lsu_mem_global.sum": None,
    "l1tex__t_sectors_pipe_lsu_mem_global.sum": None,
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum": "smem_wavefronts",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum": None,
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy",
}
# our kernels' names as ncu prints them (demangled prefix) -> the model's kernel name
KERNELS = ["cam_forward_kernel", "cam_backward_kernel", "sum_dwdg_kernel", "sum_partials_kernel", "shrink_tc_kernel",
           "shrink_finish_kernel", "mix_kernel", "dp_kernel", "dx_tc_kernel", "dA_tc_kernel", "small_reductions_kernel"]


def _layer(device="cuda"):
    import torch

    import hycam_ext

    torch.manual_seed(0)
    T, d, K, r = SHAPE["T"], SHAPE["d"], SHAPE["K"], SHAPE["r"]
    m = hycam_ext.HyCAM(hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r)).to(device, torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m.train()
    x = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    inputs = [x, h] + [p for p in m.parameters()]

    def fwd_bwd():
        torch.autograd.backward(m(x, h), go, inputs=inputs)
    return fwd_bwd


def case():
    import torch

    fb = _layer()
    fb()  # warm-up (cuBLAS heuristics, allocator); ncu profiles the kernels of both calls
    fb()
    torch.cuda.synchronize()
    print("gpu_suite_run case: done")


def measure(out: pathlib.Path, reps=30):
    import torch
    import torch.nn.functional as F

    from benchmarks.harness import Timer, interleaved

    dev = torch.device("cuda")
    timer = Timer(dev)
    T, d, K, r = SHAPE["T"], SHAPE["d"], SHAPE["K"], SHAPE["r"]
    src = torch.randn(64 << 20, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    b = torch.randn(d, d, device=dev, dtype=torch.bfloat16)
    fb = _layer()
    from hycam_ext import ops  # noqa: F401  (the kernels)

    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    hh, z, gov = (torch.randn(T, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    A = torch.randn(K, r, d, device=dev, dtype=torch.bfloat16) * 0.02
    Ab, Nb = (torch.randn(K, r, device=dev, dtype=torch.bfloat16) for _ in range(2))
    N = torch.randn(K, r, r, device=dev, dtype=torch.bfloat16) * 0.2
    B = torch.randn(K, d, r, device=dev, dtype=torch.bfloat16) * 0.02
    bb = torch.randn(K, d, device=dev, dtype=torch.bfloat16) * 0.02
    zb = torch.randn(d, device=dev, dtype=torch.bfloat16) * 0.1
    w = torch.randn(T, K, r, device=dev, dtype=torch.bfloat16)
    g = F.one_hot(torch.randint(0, K, (T,), device=dev), K).to(torch.bfloat16)
    p_saved, _ = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
    dw = torch.randn(T, K, r, device=dev, dtype=torch.bfloat16)
    fns = {
        "copy (256 MiB fp32)": lambda: dst.copy_(src),
        "cuBLAS bf16 [T, d] x [d, d]": lambda: a @ b,
        "layer fwd+bwd": fb,
        "cam_forward": lambda: torch.ops.hycam.cam_forward(hh, None, z, w, B, bb, g, 2.0, 0, zb),
        "cam_backward": lambda: torch.ops.hycam.cam_backward(gov, hh, None, z, w, B, bb, g, 2.0, 0, zb),
        "shrink": lambda: torch.ops.hycam.shrink(x, A, Ab, N, Nb),
        "shrink_backward": lambda: torch.ops.hycam.shrink_backward(dw, x, p_saved, A, N),
    }
    res = interleaved(dev, fns, reps, warmup=5, warmup_s=0.5, flush=timer.flush)
    copy = res["copy (256 MiB fp32)"]
    res["copy (256 MiB fp32)"]["rate"] = 2 * src.numel() * 4 / (copy["ms"] * 1e-3)
    gm = res["cuBLAS bf16 [T, d] x [d, d]"]
    res["cuBLAS bf16 [T, d] x [d, d]"]["rate"] = 2 * T * d * d / (gm["ms"] * 1e-3)
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "shape": SHAPE, "dtype": "bf16",
            "routing": "hard", "reps": reps}
    (out / "measured.json").write_text(json.dumps({"meta": meta, "measured": res}, indent=1))
    for k, v in res.items():
        print(f"{k:32s} median {v['ms']:.4f} ms  IQR {v['ms_q1']:.4f}-{v['ms_q3']:.4f}")


def read_ncu(path: pathlib.Path) -> dict:
    """{kernel short name: {metric: value summed over its launches}} from `ncu --csv` output."""
    if not path.exists():
        return {}
    rows = list(csv.reader(l for l in path.read_text(errors="replace").splitlines() if l.startswith('"')))
    if not rows:
        return {}
    head = rows[0]
    ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
    ui = head.index("Metric Unit") if "Metric Unit" in head else None
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1e-9, "usecond": 1e-6,
             "msecond": 1e-3, "second": 1}
    out: dict = {}
    for row in rows[1:]:
        name = next((k for k in KERNELS if k in row[ki]), None)
        if name is None:
            continue
        try:
            v = float(row[vi].replace(",", ""))
        except ValueError:
            continue
        if ui is not None and row[ui] in scale:
            v *= scale[row[ui]]
        out.setdefault(name, {})
        out[name][row[mi]] = out[name].get(row[mi], 0.0) + v
    return out


def report(out: pathlib.Path, model_path: pathlib.Path = MODEL) -> dict:
    meas = json.loads((out / "measured.json").read_text()) if (out / "measured.json").exists() else {}
    model = json.loads(model_path.read_text()) if model_path.exists() else {}
    machine = "H100 SXM"
    dev = (meas.get("meta") or {}).get("device", "")
    if "A100" in dev:
        machine = "A100 SXM"
    mo = (model.get("machines") or {}).get(machine, {})
    ends = mo.get("ends") or {}
    kern = {e: {k["kernel"]: k for k in v["kernels"]} for e, v in ends.items()}

    def modelled(kernels):
        return {e: sum(kern[e][k]["time"] for k in kernels if k in kern[e]) * 1e6 for e in kern}

    m = meas.get("measured", {})
    rows = []
    groups = {"cam_forward": ["cam_forward_kernel"],
              "cam_backward": ["cam_backward_kernel", "sum_dwdg_kernel", "sum_partials_kernel(pB)"],
              "shrink": ["shrink_tc_kernel", "shrink_finish_kernel", "mix_kernel"],
              "shrink_backward": ["dp_kernel", "dx_tc_kernel", "dA_tc_kernel", "small_reductions_kernel",
                                  "sum_partials_kernel(pA)", "sum_partials_kernel(pSmall)"]}
    for op, ks in groups.items():
        if op in m:
            mod = modelled(ks)
            rows.append({"what": op, "measured_us": m[op]["ms"] * 1e3,
                         "measured_iqr_us": [m[op]["ms_q1"] * 1e3, m[op]["ms_q3"] * 1e3],
                         "modelled_us": mod, "in_modelled_range": (min(mod.values()) <= m[op]["ms"] * 1e3
                                                                   <= max(mod.values())) if mod else None})
    layer = {}
    if "layer fwd+bwd" in m:
        T, d = SHAPE["T"], SHAPE["d"]
        copy, gemm = m["copy (256 MiB fp32)"]["rate"], m["cuBLAS bf16 [T, d] x [d, d]"]["rate"]
        min_bytes = sum(k["min_bytes"] for k in (ends.get("optimistic") or {}).get("kernels", []))
        floor = 3 * 2 * T * d * d / gemm + min_bytes / copy if min_bytes else None
        t = m["layer fwd+bwd"]["ms"] * 1e-3
        layer = {"measured_ms": t * 1e3, "measured_iqr_ms": [m["layer fwd+bwd"]["ms_q1"], m["layer fwd+bwd"]["ms_q3"]],
                 "measured_copy_TBps": copy / 1e12, "measured_cublas_TFLOPs": gemm / 1e12,
                 "floor_ms (measured rates)": floor * 1e3 if floor else None,
                 "vs_floor": t / floor if floor else None,
                 "modelled_ms": {e: v["layer"]["total_s"] * 1e3 for e, v in ends.items()},
                 "modelled_vs_floor": {e: v["layer"]["vs_floor"] for e, v in ends.items()}}
    ncu = read_ncu(out / "ncu.csv")
    ncu_rows = []
    for k, met in ncu.items():
        mk = kern.get("optimistic", {}).get(k) or kern.get("optimistic", {}).get(k + "(pB)")
        ncu_rows.append({"kernel": k, "ncu": met,
                         "modelled": None if mk is None else {
                             "dram_bytes": mk["dram_bytes"], "smem_wavefronts": mk["smem_wavefronts"],
                             "smem_conflict_wavefronts": mk["smem_wavefronts"] - mk.get("smem_ideal", 0),
                             "occupancy_pct": 100 * mk["occupancy"],
                             "time_us": {e: kern[e][k]["time"] * 1e6 for e in kern if k in kern[e]}}})
    summary = (out / "SUMMARY.txt").read_text().splitlines() if (out / "SUMMARY.txt").exists() else []
    res = {"device": (meas.get("meta") or {}), "model": str(model_path.relative_to(ROOT)) if model_path.exists()
           else None, "model_machine": machine, "label": "measured beside MODELLED predictions",
           "summary": summary, "ops": rows, "layer": layer, "ncu": ncu_rows}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("case", "measure", "report"))
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if args.what == "case":
        case()
        return 0
    if not args.out:
        ap.error("measure / report need OUT_DIR")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "measure":
        measure(out, args.reps)
    else:
        res = report(out)
        L = res["layer"]
        if L:
            print(f"layer fwd+bwd measured {L['measured_ms']:.3f} ms on {res['device'].get('device')}; "
                  f"modelled {L['modelled_ms']}; measured floor {L['floor_ms (measured rates)']}")
        print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
