"""A run, step by step: prepare (seed, load the base model and tokenizer, split and encode the
tasks) -> build the adapter -> evaluate -> train -> evaluate -> write. Used by the command line
(cli.py: one run) and by --compare (compare.py: several variants on one prepared session);
this module imports neither of them."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..diagnostics import routing_diagnostics
from .data import Formatter, TaskData, load_tasks, split_and_encode
from .distributed import DistContext, reduce_routing
from .evaluation import evaluate_loss, generation_eval
from .models import build_adapter, load_model_and_tokenizer, trainable_parameters
from .plots import plot_diagnostics, plot_routing
from .training import plan_steps, train


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


def prepare(args, device: torch.device, ctx: DistContext,
            tasks: Optional[Dict[str, List[dict]]] = None) -> Session:
    """Seed, load the base model and tokenizer, split and encode every task (``tasks``: the
    records already read from --data and the built-in set, as cli.check_inputs reads them before
    the model loads; None reads them here)."""
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    t0 = time.time()
    try:
        model, tok = load_model_and_tokenizer(args.model, args.gguf_file, device)
    except OSError as e:   # what from_pretrained raises for a path or Hub id it cannot read
        raise SystemExit(f"hycam-finetune: error: --model {args.model}: cannot load it: "
                         f"{' '.join(str(e).split())}") from None
    ctx.log(f"loaded {type(model).__name__} from {args.model} in {time.time() - t0:.1f}s "
            f"(device {device}, bf16 autocast {'on' if use_bf16 else 'off'})")
    if ctx.enabled:
        import torch.distributed as dist
        ctx.log(f"distributed: {ctx.world_size} processes ({dist.get_backend()}), global batch "
                f"{args.batch_size} x {args.grad_accum} x {ctx.world_size} examples per step")
    fmt = Formatter(tok, args.prompt_format, args.max_length)
    if tasks is None:
        tasks = load_tasks(args.data, args.builtin_examples, args.seed, args.with_builtin,
                           getattr(args, "builtin_set", "default"))
    data = split_and_encode(tasks, fmt, args.eval_fraction, args.max_eval_examples,
                            args.max_train_examples or None, args.seed, log=ctx.log)
    args.num_tasks = len(data.task_index)   # routing="task": one task id per task
    if getattr(args, "routing", "token") == "task":
        ctx.log("task routing: " + ", ".join(f"{t} -> {i}" for t, i in data.task_index.items()))
    return Session(args, device, ctx, amp_dtype, model, tok, fmt, data)


def eval_losses(s: Session, model, tag: str, collect_routing: bool = False):
    """Held-out loss / perplexity per task; with collect_routing (HyCAM) also the per-task route
    distribution per layer, reduced over ranks, and the routing diagnostics (logged)."""
    losses, routing, collected = {}, {}, {}
    for task, ex in s.data.eval_encoded.items():
        if not ex:
            continue
        run = lambda: evaluate_loss(model, ex, s.args.eval_batch_size, s.tok.pad_token_id,  # noqa: E731
                                    s.device, s.amp_dtype, s.ctx)
        if collect_routing:
            with model.collect_routing() as res:
                losses[task] = run()
            collected[task] = reduce_routing(res, s.device) if s.ctx.enabled else res
            routing[task] = collected[task]["dist"]
        else:
            losses[task] = run()
        s.ctx.log(f"{'[' + tag + ']':<8} {task}: eval loss {losses[task]['loss']:.4f}  "
                  f"ppl {losses[task]['ppl']:.2f}")
    diag = None
    if collected:
        diag = routing_diagnostics(collected, model.hycam_modules())
        m = diag["mean"]
        s.ctx.log(f"{'[' + tag + ']':<8} routing: MI(task; route) {m['mi']:.3f}  route entropy "
                  f"{m['entropy']:.3f}  specialist similarity {m['similarity']:.3f}  "
                  f"L_aux {m['aux']:.4f}  (means over layers)")
    return losses, routing, diag


def eval_generation(s: Session, model, args) -> Optional[dict]:
    if not args.gen_max_new_tokens:
        return None
    gen = generation_eval(model, s.tok, s.fmt, s.data.eval_records, args.gen_max_new_tokens,
                          args.gen_batch_size, args.gen_max_examples, s.device, s.amp_dtype,
                          s.ctx, progress=not args.no_progress, task_index=s.data.task_index)
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
                if len(metrics.get("routing_diagnostics") or []) > 1:
                    plot_diagnostics(metrics["routing_diagnostics"],
                                     str(out_dir / "routing_diagnostics.png"))
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
    hycam = method.startswith("hycam")
    diag_history: List[dict] = []

    def evaluate_now(step: int, tag: str):
        losses, routing, diag = eval_losses(s, model, tag, collect_routing=hycam)
        if diag is not None:
            diag_history.append({"step": step, **diag})
        return losses, routing

    before = (evaluate_now(0, "before")[0] if eval_before and method != "base" else None)
    global_batch, steps = plan_steps(len(s.data.train), args, s.ctx.world_size)
    result = None
    if method != "base" and steps > 0:
        result = train(model, params, s.data.train, steps, s.tok.pad_token_id, args, s.device,
                       s.amp_dtype, s.ctx,
                       on_eval=lambda step: evaluate_now(step, f"step {step}"))
    after, routing = evaluate_now(steps if result else 0, "after")
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
        "routing_diagnostics": diag_history,
    }
    write_outputs(s, model, method, metrics, routing, out_dir, args)
    return metrics


def run(args, device: torch.device, ctx: DistContext,
        tasks: Optional[Dict[str, List[dict]]] = None) -> dict:
    """One fine-tuning run (HyCAM, or the --baseline adapter)."""
    s = prepare(args, device, ctx, tasks)
    method = {"none": "hycam", "lora": "lora", "shared-cam": "shared-cam"}[args.baseline]
    return run_variant(s, method, args, Path(args.output_dir))
