"""Multi-task supervised fine-tuning with HyCAM (or a LoRA baseline).

    python -m hycam_ext.finetune                       # SmolLM2-135M-Instruct + built-in tasks, CPU ok
    python -m hycam_ext.finetune --model DIR --data a.json b.json --max-steps 500
    python -m hycam_ext.finetune --baseline lora       # same recipe, PEFT LoRA, ~same #params
    python -m hycam_ext.finetune --compare             # base, LoRA x2, shared CAM, HyCAM side by side

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
from .cli import build_parser, main, run
from .data import (ALPACA_PROMPT, IGNORE_INDEX, Formatter, batches, builtin_tasks, collate,
                   load_alpaca_file, load_tasks, split_task)
from .distributed import DistContext, init_distributed, launched_by_torchrun, resolve_device
from .evaluation import evaluate, generate_responses, score_generations
from .models import (DEFAULT_MODEL, hycam_param_count, load_model_and_tokenizer,
                     lora_rank_for_budget)

__all__ = ["ALPACA_PROMPT", "DEFAULT_MODEL", "DistContext", "Formatter", "IGNORE_INDEX", "batches",
           "build_parser", "builtin_tasks", "cli", "collate", "evaluate", "generate_responses",
           "hycam_param_count", "init_distributed", "launched_by_torchrun", "load_alpaca_file",
           "load_model_and_tokenizer", "load_tasks", "lora_rank_for_budget", "main",
           "resolve_device", "run", "score_generations", "split_task"]


def cli() -> None:
    """The hycam-finetune console script."""
    import sys
    main()
    sys.exit(0)
