"""torchrun worker for test_transformers_integration.py::test_ddp_global_aux_scope: a HyCAM-
converted tiny Llama under DDP (2 gloo ranks, aux_loss_scope='global') gives the gradients of a
single process on the concatenated batch. Gumbel noise is switched off so both see the same routes."""
import json
import sys

import torch
import torch.distributed as dist


import hycam_ext  # noqa: E402
import hycam_ext._base as hycam_base  # noqa: E402  (sample_gumbel lives there)
import hycam_ext.integrations.transformers as integ  # noqa: E402
from python_tests.hf_tiny import perturb_hycam, tiny_model  # noqa: E402


def build(scope):
    cfg = hycam_ext.HyCAMConfig(num_specialists=3, rank=4, aux_loss_coef=0.7, aux_loss_scope=scope)
    model = integ.get_hycam_model(tiny_model("llama"), cfg)
    perturb_hycam(model)
    return model.train()


def main(out_path):
    hycam_base.sample_gumbel = lambda logits: torch.zeros_like(logits)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(3, 128, (2 * world, 8), generator=torch.Generator().manual_seed(0))
    # single-process reference on the whole batch (statistics of this process only)
    ref = build("rank")
    ref_out = ref(input_ids=ids, labels=ids)
    ref_out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.trainable_parameters()}
    model = build("global")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = ids[2 * rank:2 * rank + 2]
    out = ddp(input_ids=local, labels=local)
    out.loss.backward()
    err = max(float((p.grad - ref_grads[n]).abs().max()) for n, p in model.trainable_parameters())
    router = min(float(p.grad.abs().sum()) for n, p in model.trainable_parameters()
                 if n.endswith("router_weight"))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"aux": float(out.aux_loss), "ref_aux": float(ref_out.aux_loss),
                       "max_grad_err": err, "min_router_grad": router}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
