"""Held-out evaluation: the token-level loss / perplexity over response tokens, and greedy
generation scored against the reference responses with BLEU (sacrebleu) and ROUGE-1/2/L
(rouge-score), per task and averaged over tasks."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import IGNORE_INDEX, Formatter, batches, routes_by_task
from .distributed import DistContext, all_reduce_sum, gather_lists

SCORE_KEYS = ("bleu", "rouge1", "rouge2", "rougeL")
BOOTSTRAP_SAMPLES = 200


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- loss --------------------------------------------------------------------------------------
@torch.no_grad()
def eval_sums(model, examples: List[dict], batch_size: int, pad_id: int, device,
              autocast_dtype) -> Tuple[float, int]:
    """Summed NLL over response tokens and their number (eval mode, no aux loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches(examples, batch_size, pad_id):
        b = {k: v.to(device) for k, v in b.items()}
        kw = {"task_ids": b["task_ids"]} if "task_ids" in b and routes_by_task(model) else {}
        with autocast(device, autocast_dtype):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           use_cache=False, **kw).logits
        lg = logits[:, :-1].float()
        lb = b["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                                   ignore_index=IGNORE_INDEX,
                                                   reduction="sum").item()
        count += int((lb != IGNORE_INDEX).sum())
    model.train(was_training)
    return total, count


def loss_metrics(total: float, count: int) -> dict:
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate(model, examples: List[dict], batch_size: int, pad_id: int, device, autocast_dtype):
    """Token-level mean NLL over response tokens and its perplexity (eval mode, no aux loss)."""
    return loss_metrics(*eval_sums(model, examples, batch_size, pad_id, device, autocast_dtype))


def evaluate_loss(model, examples: List[dict], batch_size: int, pad_id: int, device,
                  autocast_dtype, ctx: DistContext) -> dict:
    """evaluate(); under torchrun each rank takes a disjoint slice, the sums reduced over ranks."""
    if not ctx.enabled:
        return evaluate(model, examples, batch_size, pad_id, device, autocast_dtype)
    total, count = eval_sums(model, examples[ctx.rank::ctx.world_size], batch_size, pad_id,
                             device, autocast_dtype)
    total, count = all_reduce_sum([total, count], device)
    return loss_metrics(total, int(round(count)))


# ---- generation --------------------------------------------------------------------------------
def left_pad(prompts: Sequence[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Prompts padded on the left, so every row's last position is its last prompt token and
    generation appends to all rows at the same index."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def generate_responses(model, tok, prompts: List[List[int]], max_new_tokens: int,
                       batch_size: int, device, autocast_dtype, desc: str = "generate",
                       progress: bool = True, task_id: Optional[int] = None) -> List[str]:
    """Greedy decoding with the KV cache, batched with left padding; returns the decoded new
    tokens of each prompt (special tokens dropped), in the order of ``prompts``. ``task_id``:
    the prompts' task, for a model that routes by task."""
    from tqdm.auto import tqdm
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    # prompts of similar length together: less padding, and the order is undone below
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        idx = order[s:s + batch_size]
        b = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx],
                                                    tok.pad_token_id).items()}
        with autocast(device, autocast_dtype):
            if task_id is not None and routes_by_task(model):
                b["task_ids"] = torch.full((b["input_ids"].shape[0],), task_id, dtype=torch.long,
                                           device=device)
            seqs = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False,
                                  num_beams=1, use_cache=True, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        new = seqs[:, b["input_ids"].shape[1]:].cpu()
        for i, row in zip(idx, new):
            out[i] = tok.decode(row.tolist(), skip_special_tokens=True).strip()
    model.train(was_training)
    return out   # type: ignore[return-value]


def _corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def score_generations(preds: Sequence[str], refs: Sequence[str], seed: int = 0) -> dict:
    """Corpus BLEU and mean ROUGE-1/2/L F1 (stemmed), all on a 0-100 scale, with their
    sampling spread over the held-out examples: the standard error of each ROUGE mean, and for
    BLEU (not a mean of per-example scores) the standard deviation of BLEU over bootstrap
    resamples of the examples. exact_match: percentage of responses equal to the reference."""
    if len(preds) != len(refs):
        raise ValueError(f"preds and refs differ in length: {len(preds)} vs {len(refs)}")
    if not preds:
        raise ValueError("score_generations: no examples")
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = {k: [] for k in ("rouge1", "rouge2", "rougeL")}
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        for k in per:
            per[k].append(100.0 * s[k].fmeasure)
    n = len(preds)
    res = {"n": n, "bleu": _corpus_bleu(preds, refs)}
    for k, v in per.items():
        mean = sum(v) / n
        var = sum((x - mean) ** 2 for x in v) / max(n - 1, 1)
        res[k], res[k + "_se"] = mean, math.sqrt(var / n)
    rng = random.Random(seed)
    boot = []
    for _ in range(BOOTSTRAP_SAMPLES if n > 1 else 0):
        pick = [rng.randrange(n) for _ in range(n)]
        boot.append(_corpus_bleu([preds[i] for i in pick], [refs[i] for i in pick]))
    mb = sum(boot) / len(boot) if boot else 0.0
    res["bleu_se"] = math.sqrt(sum((x - mb) ** 2 for x in boot) / max(len(boot) - 1, 1)) if boot else 0.0
    res["exact_match"] = 100.0 * sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / n
    return res


def generation_eval(model, tok, fmt: Formatter, eval_records: Dict[str, List[dict]],
                    max_new_tokens: int, batch_size: int, max_examples: int, device,
                    autocast_dtype, ctx: DistContext, progress: bool = True,
                    samples: int = 3, task_index: Optional[Dict[str, int]] = None) -> dict:
    """Per task: greedy responses to the held-out prompts (the first ``max_examples`` of each
    split, 0 = all) scored by score_generations; "mean": the unweighted mean over tasks;
    under torchrun each rank generates a disjoint slice and the responses are gathered."""
    per_task: Dict[str, dict] = {}
    for task, recs in eval_records.items():
        recs = recs[:max_examples] if max_examples else recs
        if not recs:
            continue
        mine = list(range(ctx.rank, len(recs), ctx.world_size))
        preds = generate_responses(model, tok, [fmt.generation_prompt(recs[i]) for i in mine],
                                   max_new_tokens, batch_size, device, autocast_dtype,
                                   desc=f"generate {task}", progress=progress and ctx.is_main,
                                   task_id=(task_index or {}).get(task))
        pairs = sorted(gather_lists(list(zip(mine, preds)), ctx))
        preds = [p for _, p in pairs]
        refs = [r["output"] for r in recs]
        scores = score_generations(preds, refs)
        scores["samples"] = [{"prompt": fmt.prompt(recs[i]), "reference": refs[i],
                              "generated": preds[i]} for i in range(min(samples, len(recs)))]
        per_task[task] = scores
    return {"tasks": per_task, "mean": mean_over_tasks(per_task)}


def mean_over_tasks(per_task: Dict[str, dict]) -> dict:
    if not per_task:
        return {}
    keys = [k for k in SCORE_KEYS + ("exact_match",) if all(k in v for v in per_task.values())]
    return {k: sum(v[k] for v in per_task.values()) / len(per_task) for k in keys}
