"""--compare: several adapters on the same data, recipe, steps and seed(s), side by side.

Variants: ``base`` (the model as loaded, no training), ``lora-budget`` (PEFT LoRA at about
HyCAM's trainable budget), ``lora-r16`` (PEFT LoRA rank 16), ``shared-cam`` (HyCAM's shared CAM
alone, specialists zeroed and frozen) and ``hycam`` (K = --num-specialists, r = --rank), the
default set; beyond the paper, by name: ``hycam-router-lr`` (routers at 10x the learning rate,
aux coefficient 0.1), ``hycam-task`` (routing by task) and ``hycam-forced`` (task t always takes
specialist t mod K: the upper bound of task routing). The data
split is fixed by --seed; each training seed (--seeds) changes initialisation, batch order and
routing noise. Writes compare.json, compare.md and compare.png to --output-dir, and each
variant's metrics.json to a subfolder of it."""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import shlex
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .distributed import DistContext
from .runner import prepare, run_variant

# name -> (adapter method, argument overrides)
VARIANTS = {
    "base": ("base", {}),
    "lora-budget": ("lora", {"lora_rank": 0}),
    "lora-r16": ("lora", {"lora_rank": 16}),
    "shared-cam": ("shared-cam", {}),
    "hycam": ("hycam", {}),
    # beyond the paper (docs/quality.md): routers at 10x the learning rate with a larger aux
    # coefficient; routing by task; routes forced by task (an upper bound)
    "hycam-router-lr": ("hycam", {"router_lr_scale": 10.0, "aux_loss_coef": 0.1}),
    "hycam-task": ("hycam", {"routing": "task"}),
    "hycam-forced": ("hycam-forced", {}),
}
DEFAULT_VARIANTS = ("base", "lora-budget", "lora-r16", "shared-cam", "hycam")
METRICS = (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("exact_match", "exact match (%)"),
           ("loss", "held-out loss"))


def parse_variants(spec: str) -> List[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"--compare: unknown variant(s) {unknown or spec!r}; choose from "
                         f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def variant_args(args: argparse.Namespace, name: str, seed: int) -> argparse.Namespace:
    a = copy.copy(args)
    for k, v in VARIANTS[name][1].items():
        setattr(a, k, v)
    a.seed = seed
    a.no_save_adapter = True
    return a


def summarize(name: str, m: dict) -> dict:
    """The comparison's view of one variant run: per task (and mean) BLEU / ROUGE / loss with
    their per-example sampling spread, trainable parameters, step time, peak memory."""
    gen = m.get("generation") or {"tasks": {}, "mean": {}}
    row: Dict[str, object] = {"variant": name, "method": m["method"], "seed": m["seed"],
                              "trainable_params": m["trainable_params"], "steps": m["steps"],
                              "step_time_median_s": m["step_time_median_s"],
                              "peak_memory": m["peak_memory"]}
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match"):
        row[key] = {t: v[key] for t, v in gen["tasks"].items()}
        if key in gen["mean"]:
            row[key]["mean"] = gen["mean"][key]
        if key != "exact_match":
            row[key + "_se"] = {t: v[key + "_se"] for t, v in gen["tasks"].items()}
    row["loss"] = {t: v["loss"] for t, v in m["eval_after"].items()}
    if row["loss"]:
        row["loss"]["mean"] = sum(row["loss"].values()) / len(row["loss"])
    return row


def aggregate(rows: List[dict]) -> dict:
    """Mean over seeds of one variant's rows, with the spread: the standard deviation over seeds
    when there are several, else the single run's per-example standard error (BLEU: bootstrap)."""
    first = rows[0]
    out = {k: first[k] for k in ("variant", "method", "trainable_params", "steps")}
    out["seeds"] = [r["seed"] for r in rows]
    times = [r["step_time_median_s"] for r in rows if r["step_time_median_s"] is not None]
    out["step_time_median_s"] = sum(times) / len(times) if times else None
    mems = [r["peak_memory"]["increase_mib"] for r in rows if r["peak_memory"]]
    out["peak_memory_increase_mib"] = max(mems) if mems else None
    out["peak_memory"] = first["peak_memory"]
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match", "loss"):
        groups = first[key].keys()
        out[key] = {g: sum(r[key][g] for r in rows) / len(rows) for g in groups}
        if len(rows) > 1:
            out[key + "_err"] = {g: _std([r[key][g] for r in rows]) for g in groups}
            out[key + "_err_kind"] = "std over seeds"
        elif key + "_se" in first:
            out[key + "_err"] = dict(first[key + "_se"])
            out[key + "_err_kind"] = "per-example standard error" + (
                " (bootstrap)" if key == "bleu" else "")
    return out


def _std(xs: List[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def _fmt(v: Optional[float], err: Optional[float] = None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.{digits}f}"
    return s if err is None else f"{s} ± {err:.{digits}f}"


def markdown(agg: List[dict], tasks: List[str], header: str) -> str:
    lines = [header, "", "| variant | trainable params | step time (s, median) | peak memory "
             "increase in training (MiB) | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L | held-out loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        lines.append(f"| {a['variant']} | {a['trainable_params']:,d} | "
                     f"{_fmt(a['step_time_median_s'])} | {_fmt(a['peak_memory_increase_mib'], None, 0)} | "
                     + " | ".join(_fmt(a[k].get("mean")) for k in ("bleu", "rouge1", "rouge2", "rougeL"))
                     + f" | {_fmt(a['loss'].get('mean'), None, 3)} |")
    kinds = sorted({f"{a['variant']}: {a['rougeL_err_kind']}" for a in agg if a.get("rougeL_err_kind")})
    lines += ["", "Metric columns: unweighted mean over tasks. In the tables below ± is the spread "
              "of BLEU / ROUGE-L (" + "; ".join(kinds) + "); held-out loss has a spread only "
              "over several seeds. Peak memory: " + _memory_note(agg) + "."]
    for key, label in METRICS:
        digits = 3 if key == "loss" else 2
        lines += ["", f"**{label}** per task", "",
                  "| variant | " + " | ".join(tasks) + " | mean |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for a in agg:
            err = a.get(key + "_err") or {}
            cells = [_fmt(a[key].get(t), err.get(t), digits) for t in tasks]
            lines.append(f"| {a['variant']} | " + " | ".join(cells)
                         + f" | {_fmt(a[key].get('mean'), err.get('mean'), digits)} |")
    return "\n".join(lines) + "\n"


def _memory_note(agg: List[dict]) -> str:
    m = next((a["peak_memory"] for a in agg if a.get("peak_memory")), None)
    if not m:
        return "not measured"
    return (f"{m['kind']} ({m['scope']}) during training minus the resident size before it; "
            f"the base model and its copy are already resident")


def run_comparison(args: argparse.Namespace, device: torch.device, ctx: DistContext,
                   tasks: Optional[Dict[str, List[dict]]] = None) -> dict:
    names = parse_variants(args.compare)
    seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    out_dir = Path(args.output_dir)
    s = prepare(args, device, ctx, tasks)
    rows: Dict[str, List[dict]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            if name == "base" and rows[name]:
                continue   # no training and greedy decoding: every seed gives the same numbers
            ctx.log(f"=== {name} (seed {seed}) ===")
            a = variant_args(args, name, seed)
            m = run_variant(s, VARIANTS[name][0], a, out_dir / f"{name}-seed{seed}",
                            copy_base=True, eval_before=False)
            rows[name].append(summarize(name, m))
            gc.collect()
    command = "hycam-finetune " + " ".join(shlex.quote(x) for x in getattr(args, "argv", []))
    args_dict = {k: v for k, v in vars(args).items() if k != "argv"}
    summary = None
    if ctx.is_main:
        summary = write_comparison(out_dir, rows, list(s.data.eval_records), command, args_dict,
                                   str(device), plot=not args.no_plot)
        ctx.log((out_dir / "compare.md").read_text())
    ctx.barrier()
    return summary if summary is not None else {"variants": [aggregate(rows[n]) for n in names]}


def write_comparison(out_dir: Path, rows: Dict[str, List[dict]], tasks: List[str], command: str,
                     args_dict: dict, device: str, plot: bool = True) -> dict:
    """compare.json, compare.md and compare.png from the summarized runs of each variant."""
    from .plots import plot_comparison
    agg = [aggregate(r) for r in rows.values() if r]
    seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
    summary = {"command": command, "model": args_dict.get("model"), "device": device,
               "seeds": seeds, "tasks": tasks, "variants": agg, "runs": rows, "args": args_dict}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.json", "w") as f:
        json.dump(summary, f, indent=1)
    steps = max(a["steps"] for a in agg)
    header = (f"Comparison on {args_dict.get('model')}: {', '.join(tasks)}; {steps} steps, "
              f"seeds {seeds}.\n\nCommand: `{command}`")
    (out_dir / "compare.md").write_text(markdown(agg, tasks, header))
    if plot:
        plot_comparison(agg, tasks, str(out_dir / "compare.png"),
                        f"{Path(str(args_dict.get('model'))).name}: held-out generation and loss "
                        f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    return summary


def rebuild(out_dir: Path) -> dict:
    """The comparison files again from the variants' metrics.json under out_dir (e.g. of a run
    that was stopped before its last variant)."""
    rows: Dict[str, List[dict]] = {n: [] for n in VARIANTS}
    args_dict, tasks, device = {}, [], "?"
    for path in sorted(out_dir.glob("*-seed*/metrics.json")):
        name = path.parent.name.rsplit("-seed", 1)[0]
        if name not in VARIANTS:
            continue
        m = json.loads(path.read_text())
        rows[name].append(summarize(name, m))
        args_dict, tasks, device = m["args"], list(m["eval_after"]), m["device"]
    if not any(rows.values()):
        raise SystemExit(f"no <variant>-seed<N>/metrics.json under {out_dir}")
    argv = args_dict.pop("argv", [])
    command = "hycam-finetune " + " ".join(shlex.quote(x) for x in argv)
    return write_comparison(out_dir, {n: r for n, r in rows.items() if r}, tasks, command,
                            args_dict, device)


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m hycam_ext.finetune.compare OUTPUT_DIR  (rebuilds "
                         "compare.{json,md,png} from the variants' metrics.json files)")
    print((Path(sys.argv[1]) / "compare.md").read_text() if rebuild(Path(sys.argv[1])) else "")
