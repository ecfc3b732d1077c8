"""Multi-task supervised fine-tuning with HyCAM (or a LoRA baseline): the hycam-finetune CLI
(python -m hycam_ext.finetune). Its usage text (also `hycam-finetune --help`) is USAGE in
cli.py (the package attribute `cli` is the console-script function). Modules: cli (arguments,
checks, main), runner (one run, step by step), compare (--compare), data, models, training,
evaluation, distributed, plots. Importing this package needs only torch; running the CLI needs
the [cli] extra (pip install ".[cli]")."""
from .cli import build_parser, main
from .data import (ALPACA_PROMPT, IGNORE_INDEX, Formatter, batches, builtin_tasks, collate,
                   conflict_tasks, load_alpaca_file, load_tasks, split_task)
from .distributed import DistContext, init_distributed, launched_by_torchrun, resolve_device
from .evaluation import evaluate, generate_responses, score_generations
from .models import (DEFAULT_MODEL, hycam_param_count, load_model_and_tokenizer,
                     lora_rank_for_budget)
from .runner import run

__all__ = ["ALPACA_PROMPT", "DEFAULT_MODEL", "DistContext", "Formatter", "IGNORE_INDEX", "batches",
           "build_parser", "builtin_tasks", "conflict_tasks", "cli", "collate", "evaluate",
           "generate_responses",
           "hycam_param_count", "init_distributed", "launched_by_torchrun", "load_alpaca_file",
           "load_model_and_tokenizer", "load_tasks", "lora_rank_for_budget", "main",
           "resolve_device", "run", "score_generations", "split_task"]


def cli() -> None:
    """The hycam-finetune console script."""
    import sys
    main()
    sys.exit(0)
