"""MI(task; route) per layer over training, for every routed variant of a --compare run.

    python -m benchmarks.plot_routing RUN_DIR [--out routing_mi.png]

Reads RUN_DIR/<variant>-seed<N>/metrics.json (written by `hycam-finetune --compare ...
--eval-every E`), whose "routing_diagnostics" hold, at each evaluation, per layer: the
normalised mutual information between the task and the eval-time route, the route entropy, the
specialists' shares and similarity, and L_aux. Draws one panel per variant (a thin line per layer
and seed, the mean over layers thick) and prints a table of the last evaluation's values
(mean over layers; over seeds: mean and min-max)."""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

ROUTED = ("hycam", "hycam-router-lr", "hycam-task", "hycam-forced")


def load(run_dir: Path) -> dict:
    """{variant: [(seed, [(step, [mi per layer], mean entropy, mean similarity, mean aux)])]}"""
    out = defaultdict(list)
    for path in sorted(run_dir.glob("*-seed*/metrics.json")):
        name, seed = path.parent.name.rsplit("-seed", 1)
        if name not in ROUTED:
            continue
        m = json.loads(path.read_text())
        curve = []
        for ev in m.get("routing_diagnostics") or []:
            layers = ev["layers"]

            def mean(key):
                vals = [lay[key] for lay in layers if lay[key] is not None and not math.isnan(lay[key])]
                return sum(vals) / len(vals) if vals else float("nan")
            curve.append((ev["step"], [lay["mi"] for lay in layers], mean("entropy"),
                          mean("similarity"), mean("aux")))
        out[name].append((int(seed), curve))
    if not out:
        raise SystemExit(f"no routed variant's metrics.json with routing_diagnostics under {run_dir}")
    return out


def table(data: dict) -> str:
    def spread(vals):
        vals = [v for v in vals if not math.isnan(v)]
        if not vals:
            return "-"
        mean = sum(vals) / len(vals)
        return f"{mean:.3f}" + (f" ({min(vals):.3f}-{max(vals):.3f})" if len(vals) > 1 else "")

    lines = ["| variant | seeds | steps | MI(task; route), mean over layers | best layer's MI "
             "| route entropy | specialist similarity | L_aux |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ROUTED:
        runs = [c for _, c in data.get(name, []) if c]
        if not runs:
            continue
        last = [c[-1] for c in runs]
        lines.append(
            f"| {name} | {', '.join(str(s) for s, c in data[name] if c)} | {last[0][0]} "
            f"| {spread([sum(x[1]) / len(x[1]) for x in last])} | {spread([max(x[1]) for x in last])} "
            f"| {spread([x[2] for x in last])} | {spread([x[3] for x in last])} "
            f"| {spread([x[4] for x in last])} |")
    return "\n".join(lines)


def plot(data: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROUTED if n in data]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), sharey=True, squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, name in zip(axes[0], names):
        for i, (seed, curve) in enumerate(sorted(data[name])):
            if not curve:
                continue
            steps = [c[0] for c in curve]
            n_layers = len(curve[0][1])
            for layer in range(n_layers):
                ax.plot(steps, [c[1][layer] for c in curve], color=colours[i % 4], lw=0.5, alpha=0.3)
            ax.plot(steps, [sum(c[1]) / len(c[1]) for c in curve], color=colours[i % 4], lw=2,
                    label=f"seed {seed}, mean over {n_layers} layers")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised MI(task; route)")
    axes[0][0].legend(fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/routing_mi.png)")
    args = ap.parse_args(argv)
    data = load(args.run_dir)
    print(table(data))
    out = args.out or args.run_dir / "routing_mi.png"
    plot(data, out, "held-out MI(task; route): layers thin, mean thick\n(1 = the route names the task)")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
