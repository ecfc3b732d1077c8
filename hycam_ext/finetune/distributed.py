"""torch.distributed for the CLI under torchrun: where this process stands, joining the
process group, and the reductions of eval sums and routing statistics over ranks."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch


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

    def log(self, *args, **kwargs) -> None:
        """print() on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE > 1) describes several processes."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """--device as a torch.device ("auto": CUDA when available; under torchrun a bare "cuda" is
    this process's GPU); ValueError, naming --device, for a string that is no device."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec}: not a device (auto, cpu, cuda or cuda:N)") from None
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)   # one GPU per process
    return device


def device_problem(device: torch.device, spec: str) -> Optional[str]:
    """Why this process cannot use ``device`` (--device ``spec``); None when it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else f"torch (CUDA {torch.version.cuda}) sees no GPU")
            return f"--device {spec}: no CUDA device available ({why}); use --device cpu or auto"
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            return f"--device {spec}: {device} requested, this process sees {n} CUDA device(s)"
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            return f"--device {spec}: MPS is not available here; use --device cpu or auto"
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not (backend is not None and callable(getattr(backend, "is_available", None))
                and backend.is_available()):
            return f"--device {spec}: not available here; use --device cpu or auto"
    return None


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


def all_reduce_sum(values: Sequence[float], device) -> List[float]:
    import torch.distributed as dist
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_routing(res: dict, device) -> dict:
    """collect_routing()'s per-rank result summed over ranks: the route distributions and the
    mean router probabilities weighted by token counts, and the token counts."""
    import torch.distributed as dist
    L, K = res["dist"].shape
    counts = torch.tensor(res["tokens"], dtype=torch.float64)
    parts = [torch.nan_to_num(res[k].double(), nan=0.0) * counts[:, None]
             for k in ("dist", "q_dist")]
    flat = torch.cat([p.reshape(-1) for p in parts] + [counts]).to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    counts = flat[2 * L * K:]
    out = {"tokens": counts.tolist()}
    for i, k in enumerate(("dist", "q_dist")):
        d = flat[i * L * K:(i + 1) * L * K].view(L, K) / counts.clamp_min(1.0)[:, None]
        d[counts == 0] = float("nan")
        out[k] = d.float()
    return out


def gather_lists(items: list, ctx: DistContext) -> list:
    """Concatenate every rank's list in rank order (the identity on one process)."""
    if not ctx.enabled:
        return list(items)
    import torch.distributed as dist
    out: List[list] = [None] * ctx.world_size   # type: ignore[list-item]
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
