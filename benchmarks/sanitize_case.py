"""Small odd-shaped calls of every CUDA kernel, forward and backward, for compute-sanitizer
(memcheck, racecheck, initcheck, synccheck). Run by benchmarks/gpu_suite.sh."""
import torch
import torch.nn.functional as F

import hycam_ext


def main():
    assert torch.cuda.is_available() and hycam_ext.ops.cuda_kernels_available(), "needs the CUDA kernels"
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for (T, d, K, r) in ((7, 17, 3, 5), (1, 33, 1, 1), (0, 17, 2, 4), (133, 1031, 4, 16), (40, 260, 8, 64),
                             (70, 264, 4, 16)):  # d % 8 == 0: the tensor-core kernels stage with 16-byte copies
            for placement in ("residual", "attention"):
                for hard in (True, False):
                    cfg = hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r, hard=hard,
                                                placement=placement)
                    m = hycam_ext.HyCAM(cfg).to(dev, dtype)
                    with torch.no_grad():
                        for p in m.parameters():
                            p.normal_(0, 0.1)
                    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
                    res = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
                    a = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
                    out = m.placement_forward(x, res, a)
                    out.backward(torch.randn_like(out))
                    m.eval()
                    with torch.no_grad():
                        m(x, res)
    # the raw ops with bias-free specialists and a one-hot route
    T, d, K, r = 9, 19, 3, 4
    h, z = torch.randn(T, d, device=dev), torch.randn(T, d, device=dev)
    w, B = torch.randn(T, K, r, device=dev), torch.randn(K, d, r, device=dev)
    g = F.one_hot(torch.randint(0, K, (T,), device=dev), K).float()
    torch.ops.hycam.cam_forward(h, None, z, w, B, None, g, 2.0, 0)
    torch.ops.hycam.cam_backward(torch.randn_like(h), h, None, z, w, B, None, g, 2.0, 0)
    torch.cuda.synchronize()
    print("sanitize_case: done")


if __name__ == "__main__":
    main()
