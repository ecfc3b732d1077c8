"""What the float32 master weights cost per step: one HyCAM layer, forward + backward on bf16
activations, with float32 parameters (``HyCAMConfig.param_dtype="float32"``, the integrations'
default: every forward casts W_s [d, d] and the small parameters to bf16, and the backward casts
their bf16 gradients back to float32) against bfloat16 parameters (``param_dtype="base"`` on a
bf16 base: no casts).

MEASURED, wall clock: the two variants alternate within every repetition (their order flips
each time), so drifts of a shared machine hit both alike; medians with the min-max spread.
Also timed alone: the forward cast ``W_s.to(bf16)`` and the backward one (a bf16 [d, d] gradient
to float32). The bytes the casts move are arithmetic, not measured (see ``modelled_bytes``).

    python -m benchmarks.param_cast                       # print only
    python -m benchmarks.param_cast --out DIR             # also DIR/results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import hycam_ext


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def make_layer(d: int, K: int, r: int, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> hycam_ext.HyCAM:
    """A HyCAM with non-trivial parameters (the same values for both dtypes), computing in the
    activations' dtype as the integrations set it up."""
    cfg = hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r)
    torch.manual_seed(seed)
    layer = hycam_ext.HyCAM(cfg, device=device, dtype=torch.float32)
    with torch.no_grad():
        for p in (layer.shared_weight, layer.B, layer.shared_bias, layer.B_bias):
            if p is not None:
                p.normal_(0, 0.02)
    layer = layer.to(dtype)
    layer.compute_in_input_dtype = True
    layer.train()
    return layer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(wall ms, this process's CPU ms): on a shared CPU the second is less exposed to other
    processes taking the cores (not to their cache and memory-bandwidth use)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def summary(samples) -> dict:
    wall = [w for w, _ in samples]
    cpu = [c for _, c in samples]
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "cpu_median_ms": statistics.median(cpu), "n": len(wall)}


def modelled_bytes(d: int) -> dict:
    """ARITHMETIC, not measured: bytes the casts of W_s move per training step.
    Forward: read d*d float32 (4 B) + write d*d bf16 (2 B) = 6 d^2; backward: read the bf16
    gradient (2 B) + write it as float32 (4 B) = another 6 d^2 (PyTorch's autograd for .to())."""
    fwd = d * d * (4 + 2)
    return {"fwd_cast_bytes": fwd, "bwd_cast_bytes": fwd, "step_cast_bytes": 2 * fwd}


def bench_shape(d: int, T: int, K: int, r: int, reps: int, warmup: int,
                device: torch.device) -> dict:
    act = torch.bfloat16
    layers = {"float32": make_layer(d, K, r, torch.float32, device),
              "bfloat16": make_layer(d, K, r, torch.bfloat16, device)}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(T, d, generator=g).to(device=device, dtype=act).requires_grad_(True)
    h = torch.randn(T, d, generator=g).to(device=device, dtype=act).requires_grad_(True)
    go = torch.randn(T, d, generator=g).to(device=device, dtype=act)
    w32 = layers["float32"].shared_weight.detach()
    gw16 = torch.randn(d, d, generator=g).to(device=device, dtype=act)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = h.grad = None
            # routing noise is drawn inside; the same RNG state for both variants
            torch.manual_seed(2)
            out = layer(x, h)
            torch.autograd.backward(out, go)
        return run

    fns = {name: step(layer) for name, layer in layers.items()}
    fns["cast_fwd W_s fp32->bf16"] = lambda: w32.to(act)
    fns["cast_bwd dW_s bf16->fp32"] = lambda: gw16.to(torch.float32)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for i in range(reps):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(timed(fns[n], device))
    res = {n: summary(t) for n, t in times.items()}
    f32, b16 = res["float32"]["median_ms"], res["bfloat16"]["median_ms"]
    return {"d": d, "T": T, "K": K, "r": r, "activations": "bfloat16",
            "fwd+bwd": {"float32 params (param_dtype='float32')": res["float32"],
                        "bfloat16 params (param_dtype='base')": res["bfloat16"]},
            "casts_alone": {"fwd W_s fp32->bf16": res["cast_fwd W_s fp32->bf16"],
                            "bwd dW_s bf16->fp32": res["cast_bwd dW_s bf16->fp32"]},
            "overhead_ms_median": f32 - b16,
            "overhead_pct_median": 100.0 * (f32 - b16) / b16,
            "overhead_ms_min": res["float32"]["min_ms"] - res["bfloat16"]["min_ms"],
            "overhead_cpu_ms_median": (res["float32"]["cpu_median_ms"]
                                       - res["bfloat16"]["cpu_median_ms"]),
            "modelled": modelled_bytes(d)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", default="1024,2048,4096", help="hidden sizes, comma-separated")
    ap.add_argument("--T", type=int, default=512, help="tokens per forward")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpu-bw", type=float, default=3.35e12,
                    help="HBM bandwidth (B/s) for the MODELLED GPU cast time (H100 SXM: 3.35e12)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). 1 keeps an oversubscribed machine's "
                         "scheduling stalls of a parallel region out of every small op")
    ap.add_argument("--out", default=None, help="write DIR/results.json (nothing written without)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"device": device_label(device), "torch": torch.__version__,
            "hycam_ext": hycam_ext.__version__, "date": datetime.date.today().isoformat(),
            "cuda_kernels": hycam_ext.ops.cuda_kernels_available(), "T": args.T,
            "reps": args.reps, "warmup": args.warmup, "timing": "MEASURED wall clock, "
            "variants interleaved per repetition (order alternating)",
            "gpu_bw_Bps_modelled": args.gpu_bw,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"# {meta['device']} | torch {meta['torch']} | T={args.T} K={args.K} r={args.r} | "
          f"bf16 activations | {args.reps} interleaved reps, median [min-max] ms")
    rows = []
    for d in (int(s) for s in args.d.split(",")):
        row = bench_shape(d, args.T, args.K, args.r, args.reps, args.warmup, device)
        m = row["modelled"]
        m["gpu_step_cast_us_at_bw"] = m["step_cast_bytes"] / args.gpu_bw * 1e6
        rows.append(row)
        fb = row["fwd+bwd"]
        f32 = fb["float32 params (param_dtype='float32')"]
        b16 = fb["bfloat16 params (param_dtype='base')"]
        cf = row["casts_alone"]["fwd W_s fp32->bf16"]
        cb = row["casts_alone"]["bwd dW_s bf16->fp32"]
        print(f"d={d:5d}  fp32 params {f32['median_ms']:9.2f}"
              f" [{f32['min_ms']:.2f}-{f32['max_ms']:.2f}]"
              f"  bf16 params {b16['median_ms']:9.2f} [{b16['min_ms']:.2f}-{b16['max_ms']:.2f}]"
              f"  overhead {row['overhead_ms_median']:+.2f} ms ({row['overhead_pct_median']:+.1f}%)"
              f" [of mins {row['overhead_ms_min']:+.2f},"
              f" process CPU {row['overhead_cpu_ms_median']:+.2f}]"
              f"  | casts alone: fwd {cf['median_ms']:.3f} [{cf['min_ms']:.3f}-{cf['max_ms']:.3f}]"
              f" bwd {cb['median_ms']:.3f} [{cb['min_ms']:.3f}-{cb['max_ms']:.3f}] ms"
              f"  | arithmetic: {m['fwd_cast_bytes'] / 2**20:.0f} MiB/fwd,"
              f" {m['step_cast_bytes'] / 2**20:.0f} MiB/step; MODELLED at"
              f" {args.gpu_bw / 1e12:.2f} TB/s: {m['gpu_step_cast_us_at_bw']:.1f} us/step")
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = os.getloadavg()
        print(f"# load average (1/5/15 min): start {meta['loadavg_start']},"
              f" end {meta['loadavg_end']} on {os.cpu_count()} cores")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"# wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
