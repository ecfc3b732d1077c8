"""Figures: the per-task route distribution of a HyCAM run, and the comparison bar chart."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_routing(routing: Dict[str, torch.Tensor], path: str, title: str) -> None:
    plt = _pyplot()
    tasks = list(routing)
    n = len(tasks)
    L, K = next(iter(routing.values())).shape
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 0.8 * K * n, 1.5 + 0.22 * L), squeeze=False,
                             sharey=True)
    im = None
    for ax, task in zip(axes[0], tasks):
        im = ax.imshow(routing[task].numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("specialist")
        ax.set_xticks(range(K))
    axes[0][0].set_ylabel("layer")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of tokens")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(history: Sequence[dict], path: str) -> None:
    """Routing diagnostics over training (hycam_ext.routing_diagnostics at each evaluation):
    MI(task; route) per layer, and the layer means of route entropy, specialist similarity and
    L_aux."""
    plt = _pyplot()
    steps = [h["step"] for h in history]
    L = len(history[0]["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cmap = plt.get_cmap("viridis")
    for li in range(L):
        axes[0].plot(steps, [h["layers"][li]["mi"] for h in history], color=cmap(li / max(L - 1, 1)),
                     lw=1, label=f"layer {li}" if L <= 8 or li in (0, L - 1) else None)
    axes[0].set_title("normalised MI(task; route) per layer", fontsize=10)
    axes[0].set_ylim(-0.02, 1.02)
    for key, label in (("entropy", "route entropy / log K"), ("similarity", "specialist cosine"),
                       ("aux", "L_aux")):
        axes[1].plot(steps, [h["mean"][key] for h in history], marker="o", ms=3, label=label)
    axes[1].set_title("means over layers", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(rows: Sequence[dict], tasks: Sequence[str], path: str, title: str,
                    metrics: Sequence[tuple] = (("bleu", "BLEU"), ("rougeL", "ROUGE-L"),
                                                ("loss", "held-out loss"))) -> None:
    """Grouped bars, one panel per metric: x = the tasks and their mean, one bar per variant.
    rows: {"variant", "<metric>": {task or "mean": value}, "<metric>_err": {...} (optional)}."""
    plt = _pyplot()
    groups = list(tasks) + ["mean"]
    n = len(rows)
    width = 0.8 / max(n, 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for i, row in enumerate(rows):
            vals = [row[key].get(g, float("nan")) for g in groups]
            err = row.get(key + "_err")
            yerr = None if not err else [err.get(g, 0.0) for g in groups]
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, vals, width, yerr=yerr, capsize=2, label=row["variant"])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
