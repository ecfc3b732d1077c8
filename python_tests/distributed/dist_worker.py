"""Worker for test_distributed.py, started with torchrun (gloo, CPU). Rank 0 writes a JSON report."""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import hycam_ext


class TwoLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.cam1 = hycam_ext.HyCAM(cfg)
        self.cam2 = hycam_ext.HyCAM(cfg)

    def forward(self, x, noise):
        h = self.cam1(x, self.proj(x), noise[0])
        return self.cam2(h, h, noise[1])


def loss_fn(model, x, noise, coef, scope):
    out = model(x, noise)
    return out.pow(2).mean() + coef * hycam_ext.load_balancing_loss(model, scope=scope)


def make(cfg):
    torch.manual_seed(1)
    m = TwoLayer(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def main():
    out_path, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = hycam_ext.HyCAMConfig(hidden_size=12, num_specialists=3, rank=4, aux_loss_coef=0.5,
                                aux_loss_scope="global")
    torch.manual_seed(0)
    T = 8 * world
    x = torch.randn(T, 12, dtype=torch.float64)
    noise = -torch.empty(2, T, 3, dtype=torch.float64).exponential_().log()
    lo, hi = rank * 8, (rank + 1) * 8
    report = {}

    # single-process reference on the whole global batch (every rank computes it, rank 0 reports)
    single = make(cfg)
    loss = loss_fn(single, x, noise, cfg.aux_loss_coef, "rank")
    loss.backward()
    ref_aux = hycam_ext.load_balancing_loss(single, scope="rank").item()
    ref_grads = {n: p.grad.clone() for n, p in single.named_parameters()}

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = make(cfg)
        ddp = DDP(model)
        loss = loss_fn(ddp, x[lo:hi], noise[:, lo:hi], cfg.aux_loss_coef, "global")
        aux = hycam_ext.load_balancing_loss(model, scope="global").item()
        loss.backward()
        err = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
        report.update(aux=aux, ref_aux=ref_aux, max_grad_err=err)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        model = make(cfg)
        for m in (model.cam1, model.cam2):
            fully_shard(m)
        fully_shard(model)
        loss = loss_fn(model, x[lo:hi], noise[:, lo:hi], cfg.aux_loss_coef, "global")
        loss.backward()
        errs = []
        for n, p in model.named_parameters():
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errs.append((full - ref_grads[n.replace("_fsdp_wrapped_module.", "")]).abs().max().item())
        report.update(max_grad_err=max(errs), ref_aux=ref_aux)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
