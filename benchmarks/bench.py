"""HyCAM benchmarks: full layer and per op, hycam_ext kernels side by side with ReferenceHyCAM
eager, torch.compile(ReferenceHyCAM) and a peft LoRA layer of the same trainable budget.

    python -m benchmarks.bench --quick                 # a few shapes on whatever device is present
    python -m benchmarks.bench --device cuda           # T, d, K, r sweeps around d=4096, T=8192
    python -m benchmarks.bench --shapes 2048x1024x4x64,8192x1024x4x16   # given T x d x K x r
    python -m benchmarks.bench --help

Writes a table to stdout, and results.json + speedup.png under --out (benchmarks/results/<date>)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet the CPU memory profiler's start/stop lines
import torch  # noqa: E402

import hycam_ext  # noqa: E402
from hycam_ext import ops  # noqa: E402
from hycam_ext.reference import reference_cam, reference_shrink  # noqa: E402

from .harness import Timer, copy_bandwidth, device_name, matmul_rate, peak_memory_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    T: int
    d: int
    K: int
    r: int

    def __str__(self):
        return f"T={self.T} d={self.d} K={self.K} r={self.r}"


def parse_shapes(text: str) -> List[Shape]:
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: '{item}' is not TxdxKxr with positive integers (e.g. 2048x1024x4x16)")
        out.append(Shape(*(int(p) for p in parts)))
    return out


def shapes_for(args) -> List[Shape]:
    if args.shapes:
        return parse_shapes(args.shapes)
    if args.quick:
        if args.device == "cuda":
            return [Shape(2048, 4096, 4, 16), Shape(8192, 4096, 4, 16)]
        return [Shape(512, 1024, 4, 16), Shape(2048, 1024, 4, 16)]
    if args.full:
        return [Shape(T, d, K, r) for T in (512, 2048, 8192, 32768) for d in (1024, 2048, 4096)
                for K in (1, 2, 4, 8) for r in (8, 16, 64)]
    base = Shape(8192, 4096, 4, 16) if args.device == "cuda" else Shape(2048, 1024, 4, 16)
    out = [Shape(T, base.d, base.K, base.r) for T in (512, 2048, 8192, 32768)]
    out += [Shape(base.T, d, base.K, base.r) for d in (1024, 2048, 4096)]
    out += [Shape(base.T, base.d, K, base.r) for K in (1, 2, 4, 8)]
    out += [Shape(base.T, base.d, base.K, r) for r in (8, 16, 64)]
    seen, uniq = set(), []
    for s in out:
        if s not in seen and (args.device == "cuda" or s.T * s.d <= 8192 * 2048):
            seen.add(s)
            uniq.append(s)
    return uniq


# ------------------------------------------------------------------------------ layers
def make_layers(shape: Shape, dtype, device, impls: List[str]):
    cfg = hycam_ext.HyCAMConfig(hidden_size=shape.d, num_specialists=shape.K, rank=shape.r)
    ours = hycam_ext.HyCAM(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # a trained-looking layer, not the identity init
        for p in ours.parameters():
            p.normal_(0, 0.02)
    layers = {"hycam": ours}
    if "reference" in impls or "compiled" in impls:
        ref = hycam_ext.ReferenceHyCAM(cfg).to(device=device, dtype=dtype)
        ref.load_state_dict(ours.state_dict())
        if "reference" in impls:
            layers["reference"] = ref
        if "compiled" in impls:
            # a fresh dynamo cache per shape: otherwise the recompile limit silently turns the
            # later shapes of a sweep back into eager
            torch._dynamo.reset()
            layers["compiled"] = torch.compile(ref)
    if "lora" in impls:
        lora = make_lora(shape, cfg, ours, dtype, device)
        if lora is not None:
            layers["lora"] = lora
    return layers


def make_lora(shape: Shape, cfg, hycam_layer, dtype, device):
    """peft LoRA on a frozen d x d projection with the HyCAM layer's trainable-parameter budget;
    computes h + lora_proj(x), the additive adapter users would pick instead."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    budget = sum(p.numel() for p in hycam_layer.parameters())
    rank = max(1, budget // (2 * shape.d))

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(shape.d, shape.d, bias=False)

        def forward(self, x, h):
            return h + self.proj(x)

    model = get_peft_model(Proj(), LoraConfig(r=rank, lora_alpha=32, target_modules=["proj"]))
    return model.to(device=device, dtype=dtype)


def layer_rows(shape: Shape, dtype, device, impls, timer: Timer, floor: Dict[str, float]) -> List[dict]:
    layers = make_layers(shape, dtype, device, impls)
    x = torch.randn(shape.T, shape.d, device=device, dtype=dtype, requires_grad=True)
    h = torch.randn(shape.T, shape.d, device=device, dtype=dtype, requires_grad=True)
    go = torch.randn(shape.T, shape.d, device=device, dtype=dtype)
    rows = []
    for name, layer in layers.items():
        layer.train()
        params = [p for p in layer.parameters() if p.requires_grad]

        def fwd():
            return layer(x, h)

        def fwd_bwd():
            torch.autograd.backward(layer(x, h), go, inputs=[x, h] + params)

        try:
            with torch.no_grad():
                t_fwd_ng = timer(fwd)
            t_fwd = timer(fwd)
            t_all = timer(fwd_bwd)
            mem = peak_memory_bytes(fwd_bwd, device)
        except Exception as e:  # e.g. torch.compile unavailable: report, keep going
            rows.append({"impl": name, "stage": "error", "error": f"{type(e).__name__}: {e}"})
            continue
        for p in params + [x, h]:
            p.grad = None
        for stage, t in (("fwd(no_grad)", t_fwd_ng["ms"]), ("fwd", t_fwd["ms"]),
                         ("bwd", max(t_all["ms"] - t_fwd["ms"], 0.0)), ("fwd+bwd", t_all["ms"])):
            rows.append({"impl": name, "stage": stage, "ms": t, "peak_mem_MiB": mem / 2**20 if stage == "fwd+bwd" else None})
    # ratios against the reference (speed-up > 1: faster than that baseline)
    by = {(r["impl"], r["stage"]): r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        for base in ("reference", "compiled"):
            b = by.get((base, r["stage"]))
            if b is not None and r["ms"] > 0:
                r[f"speedup_vs_{base}"] = b["ms"] / r["ms"]
        if r["stage"] == "fwd+bwd" and ("reference", "fwd+bwd") in by and r.get("peak_mem_MiB"):
            r["mem_vs_reference"] = r["peak_mem_MiB"] / max(by[("reference", "fwd+bwd")]["peak_mem_MiB"], 1e-9)
        if r["impl"] == "hycam" and r["stage"] == "fwd+bwd" and floor:
            r["floor_ms"] = floor_ms(shape, dtype, floor)
            r["vs_floor"] = r["ms"] / r["floor_ms"]
    for r in rows:
        r.update(kind="layer", shape=str(shape), **shape.__dict__)
    return rows


def floor_ms(shape: Shape, dtype, ceil: Dict[str, float]) -> float:
    """Physical floor of a training step of the layer: the three d x d GEMMs of the shared
    projection at the measured cuBLAS rate, plus the minimum bytes of everything else at the
    measured copy bandwidth. Minimum [T, d] passes: forward reads x (shrink), h, z and writes out;
    backward reads go, h, z, x (dA) and writes dh, dz, dx (specialist part) and adds it into dx."""
    T, d, K, r = shape.T, shape.d, shape.K, shape.r
    el = torch.tensor([], dtype=dtype).element_size()
    gemm_s = 3 * 2 * T * d * d / ceil["matmul_flops"]
    td_passes = 4 + 9
    small = 2 * (T * K * r * 4 + T * K) + 4 * (K * r * d)
    return 1e3 * (gemm_s + (td_passes * T * d + small) * el / ceil["copy_Bps"])


# ------------------------------------------------------------------------------ per op
def op_rows(shape: Shape, dtype, device, timer: Timer, ceil: Dict[str, float], with_ref: bool) -> List[dict]:
    T, d, K, r = shape.T, shape.d, shape.K, shape.r
    el = torch.tensor([], dtype=dtype).element_size()

    def rnd(*s, std=1.0):
        return torch.randn(*s, device=device, dtype=dtype) * std
    x, h_in, a, z, go = rnd(T, d), rnd(T, d), rnd(T, d), rnd(T, d), rnd(T, d)
    A, Ab, N, Nb = rnd(K, r, d, std=0.02), rnd(K, r), rnd(K, r, r, std=0.2), rnd(K, r)
    B, b = rnd(K, d, r, std=0.02), rnd(K, d, std=0.02)
    w = rnd(T, K, r)
    y = torch.softmax(torch.randn(T, K, device=device), -1)
    g_hard = torch.nn.functional.one_hot(y.argmax(-1), K).to(dtype)
    p, _ = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
    dw = rnd(T, K, r)
    s = 2.0
    TD, TKR = T * d, T * K * r
    cases = [
        # name, fn, baseline fn, min bytes, flops
        ("cam_forward(train)", lambda: torch.ops.hycam.cam_forward(h_in, a, z, w, B, b, y.to(dtype), s, 0),
         lambda: reference_cam(h_in, a, z, w, B, b, y.to(dtype), s, 0),
         (4 * TD + TKR + T * K + K * d * (r + 1)) * el, 2 * K * r * TD + 8 * K * TD),
        ("cam_forward(eval,hard)", lambda: torch.ops.hycam.cam_forward(h_in, a, z, w, B, b, g_hard, s, 0),
         lambda: reference_cam(h_in, a, z, w, B, b, g_hard, s, 0),
         (4 * TD + TKR + T * K + K * d * (r + 1)) * el, 2 * r * TD + 8 * TD),
        ("cam_backward(hard)", lambda: torch.ops.hycam.cam_backward(go, h_in, a, z, w, B, b, g_hard, s, 0),
         None, (6 * TD + 2 * TKR + 2 * T * K + 2 * K * d * (r + 1)) * el, 2 * K * r * TD + 4 * r * TD),
        ("shrink", lambda: torch.ops.hycam.shrink(x, A, Ab, N, Nb),
         lambda: reference_shrink(x, A, Ab, N, Nb), (TD + 2 * TKR + K * r * d) * el, 2 * K * r * TD),
        ("shrink_backward", lambda: torch.ops.hycam.shrink_backward(dw, x, p, A, N),
         None, (2 * TD + 2 * TKR + 2 * K * r * d) * el, 4 * K * r * TD),
    ]
    rows = []
    for name, fn, ref_fn, nbytes, flops in cases:
        t = timer(fn)["ms"]
        row = {"kind": "op", "impl": "hycam", "stage": name, "shape": str(shape), **shape.__dict__, "ms": t,
               "min_MB": nbytes / 1e6, "GBps": nbytes / (t * 1e-3) / 1e9, "TFLOPs": flops / (t * 1e-3) / 1e12,
               "frac_copy_bw": nbytes / (t * 1e-3) / ceil["copy_Bps"],
               "frac_matmul": flops / (t * 1e-3) / ceil["matmul_flops"]}
        if with_ref and ref_fn is not None:
            rt = timer(ref_fn)["ms"]
            row["reference_ms"] = rt
            row["speedup_vs_reference"] = rt / t
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ output
def fmt_table(rows: List[dict]) -> str:
    cols = ["shape", "kind", "impl", "stage", "ms", "speedup_vs_reference", "speedup_vs_compiled",
            "peak_mem_MiB", "mem_vs_reference", "vs_floor", "GBps", "frac_copy_bw", "TFLOPs", "frac_matmul"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    errors = [f"{r['shape']} {r['impl']}: {r['error']}" for r in rows if r.get("stage") == "error"]
    return "\n".join(lines + (["", "errors:"] + errors if errors else []))


def plot(rows: List[dict], path: str, title: str) -> Optional[str]:
    """Left: speed-up of hycam_ext (fwd+bwd) vs T for the configurations measured at several T.
    Right: the other configurations as bars (one bar per baseline)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layer = [r for r in rows if r.get("kind") == "layer" and r.get("impl") == "hycam" and r.get("stage") == "fwd+bwd"]
    groups: Dict[tuple, list] = {}
    for r in layer:
        groups.setdefault((r["dtype"], r["d"], r["K"], r["r"]), []).append(r)
    multi = {k: sorted(v, key=lambda r: r["T"]) for k, v in groups.items() if len(v) > 1}
    single = [r for k, v in sorted(groups.items()) if len(v) == 1 for r in v]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    ax = axes[0]
    for (dt, d, K, rr), rs in sorted(multi.items()):
        for base, style in (("reference", "-o"), ("compiled", "--s"), ("lora", ":^")):
            pts = [(r["T"], r[f"speedup_vs_{base}"]) for r in rs if r.get(f"speedup_vs_{base}")]
            if base == "lora":  # speed-up vs LoRA is not stored per row: derive it from the table
                lo = {(x["T"]): x["ms"] for x in rows if x.get("impl") == "lora" and x.get("stage") == "fwd+bwd"
                      and (x["d"], x["K"], x["r"], x["dtype"]) == (d, K, rr, dt)}
                pts = [(r["T"], lo[r["T"]] / r["ms"]) for r in rs if r["T"] in lo]
            if pts:
                ax.plot(*zip(*pts), style, label=f"vs {base} ({dt} d={d} K={K} r={rr})")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("speed-up of hycam_ext, fwd+bwd (x)")
    ax.legend(fontsize=7)
    ax = axes[1]
    if single:
        labels = [f"T={r['T']}\nd={r['d']} K={r['K']}\nr={r['r']}" for r in single]
        xs = range(len(single))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], [r.get("speedup_vs_reference", 0) for r in single], width,
               label="vs reference (eager)")
        ax.bar([x + width / 2 for x in xs], [r.get("speedup_vs_compiled", 0) for r in single], width,
               label="vs torch.compile(reference)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--quick", action="store_true", help="two shapes, the main job's preset")
    ap.add_argument("--full", action="store_true", help="the full T x d x K x r product (long)")
    ap.add_argument("--shapes", default=None, help="comma list of TxdxKxr, e.g. 2048x1024x4x64 (overrides the presets)")
    ap.add_argument("--impls", default="hycam,reference,compiled,lora")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op rows")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>)")
    args = ap.parse_args(argv)
    if not ops.kernels_available():
        sys.exit("hycam_ext._C is not built: run `bash .ci/setup` first")
    if args.device == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_available()):
        sys.exit("--device cuda needs a GPU and hycam_ext built with its CUDA kernels")
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("bf16" if args.device == "cuda" else "fp32")).split(",")
    impls = args.impls.split(",")
    reps = args.reps or (50 if args.device == "cuda" else 10)
    timer = Timer(device, warmup=3 if args.device == "cuda" else 1, reps=reps)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{args.device}-{date}")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    meta = {"device": device_name(device), "torch": torch.__version__, "hycam_ext": hycam_ext.__version__,
            "date": date, "cuda_kernels": ops.cuda_kernels_available()}
    shapes = shapes_for(args)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    rows: List[dict] = []
    ceilings = {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        ceil = {"copy_Bps": copy_bandwidth(device, timer),
                "matmul_flops": matmul_rate(device, dtype, timer, 4096 if args.device == "cuda" else 1024,
                                            shapes[0].d)}
        ceilings[dname] = ceil
        for shape in tqdm(shapes, desc=f"{dname} shapes", file=sys.stderr):
            new = layer_rows(shape, dtype, device, impls, timer, ceil)
            if not args.no_ops:
                new += op_rows(shape, dtype, device, timer, ceil, with_ref=True)
            for r in new:
                r.update(dtype=dname, device=meta["device"], torch=meta["torch"])
            rows += new
    table = fmt_table(rows)
    header = (f"hycam_ext benchmark | {meta['device']} | torch {meta['torch']} | {date} | "
              + " | ".join(f"{k}: copy {v['copy_Bps'] / 1e9:.1f} GB/s, matmul {v['matmul_flops'] / 1e12:.2f} TFLOP/s"
                           for k, v in ceilings.items()))
    print(header)
    print(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "ceilings": ceilings, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(header + "\n" + table + "\n")
    png = plot(rows, os.path.join(out, "speedup.png"),
               f"hycam_ext speed-up | {meta['device']} | torch {meta['torch']} | {date} | {','.join(dtypes)}")
    print(f"\nwrote {out}/results.json, results.txt" + (f", {os.path.basename(png)}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
