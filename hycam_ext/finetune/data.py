"""Data: the built-in tasks, alpaca-format files, held-out splits, tokenisation and batching."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

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


# Conflicting tasks: the same digit sequences, incompatible answers; the instruction states the
# task, so every method can in principle tell them apart.
_CONFLICT_TASKS = {
    "reverse": ("Reverse the sequence of digits.", lambda s: s[::-1]),
    "sort": ("Sort the digits in ascending order.", sorted),
    "rotate": ("Rotate the sequence one place to the left.", lambda s: s[1:] + s[:1]),
    "swap": ("Swap each adjacent pair of digits.",
             lambda s: [s[i ^ 1] if (i ^ 1) < len(s) else s[i] for i in range(len(s))]),
}


def conflict_tasks(num_examples: int = 200, seed: int = 0) -> Dict[str, List[dict]]:
    """Four conflicting digit-permutation tasks (reverse, sort, rotate, swap) over the same
    inputs: every task sees the same random sequences of 5-7 digits, in the same order."""
    rng = random.Random(seed)
    inputs = [[rng.randint(0, 9) for _ in range(rng.randint(5, 7))] for _ in range(num_examples)]
    return {name: [{"instruction": instr, "input": " ".join(map(str, s)),
                    "output": " ".join(map(str, fn(list(s))))} for s in inputs]
            for name, (instr, fn) in _CONFLICT_TASKS.items()}


BUILTIN_SETS = {"default": builtin_tasks, "conflict": conflict_tasks}


def load_alpaca_file(path: str) -> List[dict]:
    """The records of one alpaca-format JSON file; ValueError naming the file when it is not
    one (not UTF-8, not JSON, not a list of records with instruction and output)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
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

    def prompt_ids(self, rec: dict) -> List[int]:
        return self.tok(self.prompt(rec), add_special_tokens=self.format != "chat")["input_ids"]

    def generation_prompt(self, rec: dict) -> List[int]:
        """The prompt a generation starts from: at most max_length tokens, cut from the left as
        encode() cuts it, so the model sees the end of the instruction it was trained on."""
        return self.prompt_ids(rec)[-self.max_length:]

    def encode(self, rec: dict) -> Dict[str, List[int]]:
        p = self.prompt_ids(rec)
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
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("task_id" in b for b in batch):
        out["task_ids"] = torch.tensor([b["task_id"] for b in batch], dtype=torch.long)
    return out


def routes_by_task(model) -> bool:
    """Whether ``model`` (HyCAMModel, possibly inside DDP) routes by task (routing="task")."""
    for _ in range(4):
        cfg = getattr(model, "hycam_config", None)
        if cfg is not None:
            return cfg.routing == "task"
        model = getattr(model, "module", None)
        if model is None:
            return False
    return False


def model_inputs(batch: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """A collated batch as ``model``'s keyword arguments: task_ids only for task routing."""
    if "task_ids" in batch and not routes_by_task(model):
        return {k: v for k, v in batch.items() if k != "task_ids"}
    return batch


def batches(examples: List[dict], batch_size: int, pad_id: int):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)




def load_tasks(data_files: Optional[Sequence[str]], builtin_examples: int, seed: int,
               include_builtin: bool = False, builtin_set: str = "default") -> Dict[str, List[dict]]:
    """Task name -> records: one task per alpaca file (name = file stem, made unique), and the
    built-in tasks when no file is given or include_builtin is set."""
    tasks: Dict[str, List[dict]] = {}
    for f in data_files or ():
        name = Path(f).stem
        base_name, i = name, 2
        while name in tasks:
            name, i = f"{base_name}_{i}", i + 1
        tasks[name] = load_alpaca_file(f)
    if include_builtin or not data_files:
        for name, recs in BUILTIN_SETS[builtin_set](builtin_examples, seed).items():
            if name in tasks:
                raise ValueError(f"a file named {name!r} clashes with the built-in task "
                                 f"of that name; rename the file or drop --with-builtin")
            tasks[name] = recs
    return tasks


class TaskData:
    """The encoded training stream (every task, each example tagged with its task) and, per task,
    the held-out records (raw, for generation) and their encodings (for the loss)."""

    def __init__(self, train: List[dict], eval_records: Dict[str, List[dict]],
                 eval_encoded: Dict[str, List[dict]]):
        self.train, self.eval_records, self.eval_encoded = train, eval_records, eval_encoded
        # task name -> task id (routing="task"): the order of the tasks (the --data files, then
        # the built-in tasks)
        self.task_index = {name: i for i, name in enumerate(eval_records)}


def split_and_encode(tasks: Dict[str, List[dict]], fmt: Formatter, eval_fraction: float,
                     max_eval: int, max_train: Optional[int], seed: int, log=print) -> TaskData:
    train: List[dict] = []
    eval_records: Dict[str, List[dict]] = {}
    eval_encoded: Dict[str, List[dict]] = {}
    for ti, (name, recs) in enumerate(tasks.items()):
        tr, ev = split_task(recs, eval_fraction, max_eval, max_train, seed + ti)
        train += [dict(fmt.encode(r), task=name, task_id=ti) for r in tr]
        eval_records[name] = ev
        eval_encoded[name] = [dict(fmt.encode(r), task_id=ti) for r in ev]
        log(f"task {name}: {len(tr)} train / {len(ev)} held-out examples")
    if not train:
        raise SystemExit("no training examples")
    return TaskData(train, eval_records, eval_encoded)
