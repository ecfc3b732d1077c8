"""torchrun worker for test_scale_out.py: runs ``hycam_ext.finetune.main`` on every rank and writes
the metrics each rank got back to <report_dir>/rank<r>.json. With --no-noise as the first
argument, Gumbel routing noise is switched off, so that a run on N processes can be compared
with a single process exactly (both then route deterministically)."""
import json
import os
import sys


import torch  # noqa: E402

import hycam_ext._base as hycam_base  # noqa: E402  (sample_gumbel lives there)
from hycam_ext import finetune  # noqa: E402


def main(argv):
    report_dir, argv = argv[0], argv[1:]
    if argv and argv[0] == "--no-noise":
        hycam_base.sample_gumbel = lambda logits: torch.zeros_like(logits)
        argv = argv[1:]
    metrics = finetune.main(argv)
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    metrics["process_group_alive_after_main"] = bool(dist.is_initialized())
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(metrics, f)


if __name__ == "__main__":
    main(sys.argv[1:])
