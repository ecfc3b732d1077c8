"""The training loop: the micro-batch stream shared by every rank, optimizer and schedule, DDP,
one optimizer step with gradient accumulation, and the step-time / peak-memory measurements."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import time
from typing import Iterator, List, Optional

import torch

from .data import collate, model_inputs
from .distributed import DistContext, all_reduce_sum
from .evaluation import autocast


@dataclasses.dataclass
class TrainResult:
    history: List[dict]
    step_times_s: List[float]
    train_time_s: float
    step_time_median_s: float
    peak_memory: dict


def plan_steps(num_train: int, args, world: int):
    """(global batch, optimizer steps): --max-steps, or --epochs over the training stream."""
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = math.ceil(num_train / global_batch)
    steps = args.max_steps if args.max_steps > 0 else max(
        1, int(math.ceil(steps_per_epoch * args.epochs)))
    return global_batch, steps


def micro_batches(train: List[dict], batch_size: int, pad_id: int, seed: int,
                  ctx: DistContext) -> Iterator[dict]:
    """Every rank walks the same shuffled stream of micro-batches (same seed); rank r keeps the
    ones at positions r, r + world, ... so a step's grad_accum * world micro-batches are split
    disjointly, as one process with grad_accum * world accumulation steps would see them."""
    rng = random.Random(seed)

    def index_batches():
        while True:
            order = list(range(len(train)))
            rng.shuffle(order)
            for i in range(0, len(order), batch_size):
                yield order[i:i + batch_size]

    stream = index_batches()
    while True:
        for j in range(ctx.world_size):
            idx = next(stream)
            if j == ctx.rank:
                yield collate([train[k] for k in idx], pad_id)


def wrap_ddp(model, device: torch.device, ctx: DistContext, seed: int):
    """DDP around the model under torchrun (the model itself otherwise). DDP broadcasts rank 0's
    trainable weights; afterwards each rank draws its own routing noise (seed + rank) for its
    own tokens. No static_graph: it breaks no_sync() accumulation; reentrant checkpointing works
    without it since every trainable parameter is used once per forward."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(seed + ctx.rank)
    return ddp


def train_step(train_model, stream, params, opt, sched, args, device, amp_dtype,
               ctx: DistContext) -> dict:
    """One optimizer step over grad_accum micro-batches; loss and aux loss as the mean over
    ranks (what one process with grad_accum * world accumulation steps logs)."""
    tot_loss, tot_aux = 0.0, 0.0
    for micro in range(args.grad_accum):
        b = {k: v.to(device) for k, v in model_inputs(next(stream), train_model).items()}
        sync = not ctx.enabled or micro == args.grad_accum - 1
        with (contextlib.nullcontext() if sync else train_model.no_sync()):
            with autocast(device, amp_dtype):
                out = train_model(**b, use_cache=False)
            loss = out.loss / args.grad_accum
            loss.backward()
        tot_loss += loss.item()
        aux = out.get("aux_loss") if hasattr(out, "get") else None
        tot_aux += 0.0 if aux is None else float(aux.detach()) / args.grad_accum
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if ctx.enabled:
        tot_loss, tot_aux = (v / ctx.world_size for v in all_reduce_sum([tot_loss, tot_aux], device))
    return {"loss": tot_loss, "aux_loss": tot_aux, "lr": sched.get_last_lr()[0]}


def train(model, params, train_data: List[dict], total_steps: int, pad_id: int, args,
          device: torch.device, amp_dtype, ctx: DistContext, on_eval=None) -> TrainResult:
    """``on_eval(step)``: called every ``args.eval_every`` optimizer steps (not after the last)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup
    train_model = wrap_ddp(model, device, ctx, args.seed)
    groups = params
    if getattr(args, "router_lr_scale", 1.0) != 1.0:
        from ..modules import hycam_param_groups
        groups = hycam_param_groups(model, args.lr, args.router_lr_scale, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    stream = micro_batches(train_data, args.batch_size, pad_id, args.seed, ctx)
    model.train()
    history, step_times = [], []
    bar = tqdm(range(total_steps), desc="train", disable=args.no_progress or not ctx.is_main,
               dynamic_ncols=True)
    meter = PeakMemory(device)
    t_train = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        rec = train_step(train_model, stream, params, opt, sched, args, device, amp_dtype, ctx)
        step_times.append(time.perf_counter() - t0)   # kept out of history: ranks differ in it
        history.append({"step": step + 1, **rec})
        bar.set_postfix(loss=f"{rec['loss']:.4f}", aux=f"{rec['aux_loss']:.3f}")
        every = getattr(args, "eval_every", 0)
        if on_eval is not None and every and (step + 1) % every == 0 and step + 1 < total_steps:
            on_eval(step + 1)
            model.train()
    bar.close()
    train_time = time.perf_counter() - t_train
    times = sorted(step_times)
    median = times[len(times) // 2] if times else float("nan")
    return TrainResult(history, step_times, train_time, median, meter.read())


class PeakMemory:
    """Peak memory of what runs after construction. CUDA: torch's peak allocated bytes. CPU: the
    process's peak resident set (VmHWM), reset at construction through /proc/self/clear_refs
    where the kernel allows it; otherwise ru_maxrss, the peak over the whole process so far
    (then ``scope`` says so)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = "since reset"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.before = torch.cuda.memory_allocated(device)
            return
        import gc
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.scope = "process lifetime"
        self.before = _rss_bytes()

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            kind = "cuda max_memory_allocated"
        else:
            peak = _peak_rss_bytes() if self.scope == "since reset" else (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            kind = "peak RSS (VmHWM)" if self.scope == "since reset" else "ru_maxrss"
        mib = 1024.0 ** 2
        return {"kind": kind, "scope": self.scope, "peak_mib": peak / mib,
                "before_mib": self.before / mib, "increase_mib": (peak - self.before) / mib}


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    v = _status_kib("VmRSS")
    return 0 if v is None else v * 1024


def _peak_rss_bytes() -> int:
    v = _status_kib("VmHWM")
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if v is None else v) * 1024
