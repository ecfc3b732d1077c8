"""HyCAM benchmarks: full layer and per op, hycam_ext kernels side by side with ReferenceHyCAM
eager, torch.compile(ReferenceHyCAM) and a peft LoRA layer of the same trainable budget.

    python -m benchmarks.bench --quick                 # a few shapes on whatever device is present
    python -m benchmarks.bench --device cuda           # T, d, K, r sweeps around d=4096, T=8192
    python -m benchmarks.bench --shapes 2048x1024x4x64,8192x1024x4x16   # given T x d x K x r
    python -m benchmarks.bench --help

Writes a table to stdout; with --out DIR also DIR/results.json, results.txt and speedup.png (nothing is
written without --out).

Timing (benchmarks/harness.py, interleaved): every variant is warmed up (a few calls and at least a
fraction of a second), then the variants' repetitions are interleaved round by round, so a slow
phase of a shared machine hits them alike. Each stage is timed on its own: fwd(no_grad), fwd,
bwd (the backward alone, its forward run untimed before each repetition) and fwd+bwd (both, one
timed region); nothing is derived by subtraction. Rows carry the median and its spread (quartiles,
min, max); a row whose interquartile range is over WIDE of its median, or a speed-up whose two
interquartile ranges overlap, is flagged: not rankable on this run.""" 
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

from .harness import Timer, copy_bandwidth, device_name, interleaved, matmul_rate, peak_memory_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDE = 0.15  # a row's interquartile range above this share of its median: too noisy to rank


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
    stages = {"fwd(no_grad)": {}, "fwd": {}, "bwd": {}, "fwd+bwd": {}}
    mems = {}
    for name, layer in list(layers.items()):
        layer.train()
        params = [p for p in layer.parameters() if p.requires_grad]
        inputs = [x, h] + params

        def fwd_ng(layer=layer):
            with torch.no_grad():
                return layer(x, h)

        def fwd(layer=layer):
            return layer(x, h)

        def bwd(out, inputs=inputs):
            torch.autograd.backward(out, go, inputs=inputs)

        def fwd_bwd(layer=layer, inputs=inputs):
            torch.autograd.backward(layer(x, h), go, inputs=inputs)

        try:  # one call of each first: an implementation that cannot run is reported, not timed
            fwd_ng()
            fwd_bwd()
            mems[name] = peak_memory_bytes(fwd_bwd, device)
        except Exception as e:  # e.g. torch.compile unavailable: report, keep going
            rows.append({"impl": name, "stage": "error", "error": f"{type(e).__name__}: {e}"})
            del layers[name]
            continue
        stages["fwd(no_grad)"][name] = fwd_ng
        stages["fwd"][name] = fwd
        stages["bwd"][name] = (fwd, bwd)
        stages["fwd+bwd"][name] = fwd_bwd
    for stage, fns in stages.items():
        if not fns:
            continue
        res = interleaved(device, fns, timer.reps, warmup=timer.warmup, warmup_s=timer.warmup_s, flush=timer.flush,
                          min_time_s=timer.min_time_s, max_reps=4 * timer.reps)
        for name, st in res.items():
            rows.append({"impl": name, "stage": stage, **st,
                         "peak_mem_MiB": mems[name] / 2**20 if stage == "fwd+bwd" else None})
    for p in [x, h] + [p for layer in layers.values() for p in layer.parameters()]:
        p.grad = None
    # ratios against the reference (speed-up > 1: faster than that baseline); a ratio whose two
    # interquartile ranges overlap cannot be ranked on this run
    by = {(r["impl"], r["stage"]): r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        flags = []
        if r["iqr_rel"] > WIDE:
            flags.append("wide")
        for base in ("reference", "compiled"):
            b = by.get((base, r["stage"]))
            if b is not None and r["ms"] > 0 and b is not r:
                r[f"speedup_vs_{base}"] = b["ms"] / r["ms"]
                r[f"speedup_vs_{base}_range"] = [b["ms_q1"] / r["ms_q3"], b["ms_q3"] / r["ms_q1"]]
                if r["impl"] == "hycam" and not (r["ms_q3"] < b["ms_q1"] or b["ms_q3"] < r["ms_q1"]):
                    flags.append(f"~{base}")
        r["flag"] = ",".join(flags) or None
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
        fns = {"hycam": fn}
        if with_ref and ref_fn is not None:
            fns["reference"] = ref_fn
        res = interleaved(device, fns, timer.reps, warmup=timer.warmup, warmup_s=timer.warmup_s, flush=timer.flush,
                          min_time_s=timer.min_time_s, max_reps=4 * timer.reps)
        st = res["hycam"]
        t = st["ms"]
        row = {"kind": "op", "impl": "hycam", "stage": name, "shape": str(shape), **shape.__dict__, **st,
               "min_MB": nbytes / 1e6, "GBps": nbytes / (t * 1e-3) / 1e9, "TFLOPs": flops / (t * 1e-3) / 1e12,
               "frac_copy_bw": nbytes / (t * 1e-3) / ceil["copy_Bps"],
               "frac_matmul": flops / (t * 1e-3) / ceil["matmul_flops"]}
        flags = ["wide"] if st["iqr_rel"] > WIDE else []
        if "reference" in res:
            rs = res["reference"]
            row["reference_ms"] = rs["ms"]
            row["speedup_vs_reference"] = rs["ms"] / t
            row["speedup_vs_reference_range"] = [rs["ms_q1"] / st["ms_q3"], rs["ms_q3"] / st["ms_q1"]]
            if not (st["ms_q3"] < rs["ms_q1"] or rs["ms_q3"] < st["ms_q1"]):
                flags.append("~reference")
        row["flag"] = ",".join(flags) or None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ output
def fmt_table(rows: List[dict]) -> str:
    for r in rows:  # the spread beside the median: "q1-q3" (interquartile range) and min-max
        if "ms_q1" in r:
            r["IQR ms"] = f"{r['ms_q1']:.3g}-{r['ms_q3']:.3g}"
            r["min-max ms"] = f"{r['ms_min']:.3g}-{r['ms_max']:.3g}"
    cols = ["shape", "kind", "impl", "stage", "ms", "IQR ms", "min-max ms", "flag", "speedup_vs_reference",
            "speedup_vs_compiled", "peak_mem_MiB", "mem_vs_reference", "vs_floor", "GBps", "frac_copy_bw",
            "TFLOPs", "frac_matmul"]
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
    for r in rows:
        r.pop("IQR ms", None)
        r.pop("min-max ms", None)
    errors = [f"{r['shape']} {r['impl']}: {r['error']}" for r in rows if r.get("stage") == "error"]
    notes = [f"ms: median of the interleaved repetitions; flag wide: IQR over {WIDE:.0%} of the median; "
             "~base: the interquartile ranges of this row and the base overlap (the speed-up cannot be ranked)"]
    return "\n".join(lines + [""] + notes + (["", "errors:"] + errors if errors else []))


def compare_runs(old: List[dict], new: List[dict]) -> str:
    """Two runs compared row by row: the speed-ups of hycam_ext (what the table ranks) agree when
    their quartile ranges overlap, the times when their interquartile ranges do (times also move
    with the load of a shared machine between runs; the interleaved ratios much less)."""
    key = lambda r: (r.get("dtype"), r.get("shape"), r.get("kind"), r.get("impl"), r.get("stage"))  # noqa: E731
    before = {key(r): r for r in old if "ms_q1" in r}
    out = []
    for what in ("speed-ups", "times"):
        agree, differ = 0, []
        for r in new:
            b = before.get(key(r))
            if b is None or "ms_q1" not in r:
                continue
            if what == "times":
                lo1, hi1, lo2, hi2, v1, v2 = b["ms_q1"], b["ms_q3"], r["ms_q1"], r["ms_q3"], b["ms"], r["ms"]
            else:
                if r["impl"] != "hycam" or "speedup_vs_reference_range" not in r or \
                        "speedup_vs_reference_range" not in b:
                    continue
                (lo1, hi1), (lo2, hi2) = b["speedup_vs_reference_range"], r["speedup_vs_reference_range"]
                v1, v2 = b["speedup_vs_reference"], r["speedup_vs_reference"]
            if lo2 <= hi1 and lo1 <= hi2:
                agree += 1
            else:
                differ.append(f"  {r['shape']} {r['kind']} {r['impl']} {r['stage']}: {v1:.3g} [{lo1:.3g}-{hi1:.3g}] "
                              f"then {v2:.3g} [{lo2:.3g}-{hi2:.3g}]")
        out.append(f"compared with the earlier run, {what}: {agree} of {agree + len(differ)} rows agree within "
                   f"their ranges" + (":" if not differ else "; these do not:\n" + "\n".join(differ)))
    return "\n".join(out)


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
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default: GPU 50, CPU 15, "
                    "--quick on CPU 7)")
    ap.add_argument("--compare", metavar="RESULTS_JSON", default=None,
                    help="an earlier run's results.json: say for every row of both whether the two runs agree "
                         "(their interquartile ranges overlap)")
    ap.add_argument("--out", default=None, help="write results.json, results.txt and speedup.png into this folder "
                    "(nothing is written without it; e.g. benchmarks/results/<device>-<date>)")
    args = ap.parse_args(argv)
    if not ops.kernels_available():
        sys.exit("hycam_ext._C is not built: run `bash .ci/setup` first")
    if args.device == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_available()):
        sys.exit("--device cuda needs a GPU and hycam_ext built with its CUDA kernels")
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("bf16" if args.device == "cuda" else "fp32")).split(",")
    impls = args.impls.split(",")
    reps = args.reps or (50 if args.device == "cuda" else (7 if args.quick else 15))
    # short stages get more rounds (at least min_time_s of the slowest variant, at most 4 x reps)
    timer = Timer(device, warmup=5 if args.device == "cuda" else (1 if args.quick else 2), reps=reps,
                  warmup_s=0.2 if args.device == "cuda" else (0.2 if args.quick else 1.0),
                  min_time_s=0.1 if args.device == "cuda" else (0.4 if args.quick else 2.0))
    date = datetime.date.today().isoformat()
    out = args.out
    if out:
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
    if args.compare:
        with open(args.compare) as f:
            print("\n" + compare_runs(json.load(f)["rows"], rows))
    if not out:
        return rows
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
