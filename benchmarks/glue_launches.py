"""Every PyTorch op outside our kernels that one HyCAM layer runs, forward and backward, counted.

    python -m benchmarks.glue_launches [--shape TxdxKxr] [--soft]

Runs `HyCAM.forward(x, h)` and its backward once (training mode, bf16, on the CPU: the Python
code that issues the ops is the same on CUDA) under a TorchDispatchMode that sees every aten op
after autograd. On a GPU each such op is one kernel launch, except: views and other ops that only
make a tensor header (no launch), our hycam:: ops (modelled kernel by kernel), and the GEMMs of
the shared projection (aten mm / addmm: modelled at the matmul rate). The count is what the cost
model charges as launch latency for PyTorch's glue (benchmarks/gpu_model.py). The ops on the
[T, K]-sized routing tensors and the weight concatenations move few bytes: they are latency, not
bandwidth. Counted in the steady state: one forward + backward runs before the counted one (the
layer keeps a few tiny constants, such as the router slots' identity mix, from its first call).
python_tests/ops/test_glue_launches.py pins the count."""
from __future__ import annotations

import argparse
import collections

# ops that launch nothing on a GPU: tensor headers, allocations without a fill
_FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach", "alias",
         "lift_fresh", "_local_scalar_dense", "set_", "resize_"}
_GEMM = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "linear", "matmul"}


def count(T=64, d=64, K=4, r=16, hard=True, dtype=None, bias=True) -> dict:
    """{op name: launches} of one forward + backward, our ops and the GEMMs listed apart;
    "forward" / "backward": the glue launches of each pass."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import hycam_ext

    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    cfg = hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r, hard=hard, bias=bias)
    m = hycam_ext.HyCAM(cfg).to(dtype).train()
    for p in m.parameters():  # a trained layer: nothing is zero
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    h = torch.randn(T, d, dtype=dtype, requires_grad=True)
    go = torch.randn(T, d, dtype=dtype)
    m(x, h).backward(go)   # warm up: the steady state is what a training step sees
    m.zero_grad(set_to_none=True)
    x.grad = h.grad = None
    seen = collections.Counter()
    passes = {"forward": collections.Counter(), "backward": collections.Counter()}
    current = passes["forward"]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__ if func.namespace == "aten" else f"{func.namespace}::{func.__name__}"
            n = 0 if getattr(func, "is_view", False) else 1
            seen[name] += n
            current[name] += n
            return func(*args, **(kwargs or {}))

    def glue_of(counter):
        return {k: v for k, v in counter.items()
                if v and k not in _FREE and k not in _GEMM and not k.startswith("hycam")}

    with Count():
        out = m(x, h)
        current = passes["backward"]
        out.backward(go)
    glue = glue_of(seen)
    return {"glue": dict(sorted(glue.items())), "glue_launches": sum(glue.values()),
            "forward": dict(sorted(glue_of(passes["forward"]).items())),
            "backward": dict(sorted(glue_of(passes["backward"]).items())),
            "ours": {k: v for k, v in seen.items() if k.startswith("hycam")},
            "gemm": {k: v for k, v in seen.items() if k in _GEMM}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x64x4x16", help="T x d x K x r (the count does not depend on it)")
    ap.add_argument("--soft", action="store_true", help="soft routing")
    ap.add_argument("--no-bias", action="store_true", help="HyCAMConfig(bias=False)")
    args = ap.parse_args(argv)
    T, d, K, r = (int(v) for v in args.shape.split("x"))
    c = count(T, d, K, r, hard=not args.soft, bias=not args.no_bias)
    print("  fwd  bwd  all")
    for k, v in c["glue"].items():
        print(f"{c['forward'].get(k, 0):5d}{c['backward'].get(k, 0):5d}{v:5d}  {k}")
    print(f"{c['glue_launches']:4d}  PyTorch glue launches in all (our ops: {c['ours']}; GEMMs: {c['gemm']})")


if __name__ == "__main__":
    main()
