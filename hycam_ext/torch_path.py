"""The torch path: HyCAM's maths written once in plain PyTorch.

Two implementations compute a HyCAM layer: **the kernels** (``torch.ops.hycam.*``, C++/CUDA,
wrapped in ops.py) and **the torch path** (this file). Every pure-PyTorch computation of the
maths goes through these functions:

* ``HyCAMConfig(use_kernels=False)`` or ``HYCAM_USE_REFERENCE=1``: ops.py routes ``shrink``,
  ``cam`` and ``projections`` here instead of to the kernels;
* the oracle (reference.py): ``ReferenceHyCAM`` is the layer on the torch path, and the tests
  check the kernels against the torch path run in float64.

It is written the way the authors wrote HyCAM (a Python loop over the specialists, torch.stack,
a weighted sum), so the oracle and the benchmarks' plain-PyTorch baseline are their
formulation. Dense over the specialists: it materialises [T, K, d] tensors that the kernels
never write. Shapes and formulas: ops.py's module docstring and docs/formulas.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .config import Placement


def torch_shrink(x: torch.Tensor, A: torch.Tensor, A_bias: Optional[torch.Tensor],
                 N: torch.Tensor, N_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """w [T, K, r]: w_k = N_k (A_k x + a_k) + n_k, the authors' per-specialist chain of linear
    maps, stacked."""
    outs = []
    for k in range(A.shape[0]):
        p = F.linear(x, A[k], None if A_bias is None else A_bias[k])
        outs.append(F.linear(p, N[k], None if N_bias is None else N_bias[k]))
    return torch.stack(outs, dim=1)


def torch_cam(h_in: torch.Tensor, a: Optional[torch.Tensor], z: torch.Tensor, w: torch.Tensor,
              B: torch.Tensor, b: Optional[torch.Tensor], g: torch.Tensor, scale: float,
              placement: Placement = Placement.RESIDUAL,
              z_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The placement formula with c = 1 + silu(z + z_bias) + sum_k g_k silu(scale (B_k w_k + b_k)):
    RESIDUAL (h_in + a) * c (h_in * c without a), ATTENTION h_in + a * c. As the authors wrote
    it: each specialist expanded, silu, stacked into [T, K, d], weighted sum."""
    experts = torch.stack([F.silu(scale * F.linear(w[:, k], B[k], None if b is None else b[k]))
                           for k in range(B.shape[0])], dim=1)
    if z_bias is not None:
        z = z + z_bias
    c = 1 + F.silu(z) + (g.unsqueeze(-1) * experts).sum(dim=1)
    if Placement.of(placement) == Placement.RESIDUAL:
        return (h_in if a is None else h_in + a) * c
    return h_in + a * c


def torch_projections(x: torch.Tensor, W_s: torch.Tensor, b_s: Optional[torch.Tensor],
                      W_r: torch.Tensor, b_r: Optional[torch.Tensor], A: torch.Tensor,
                      A_bias: Optional[torch.Tensor], N: torch.Tensor,
                      N_bias: Optional[torch.Tensor]):
    """The layer's three maps of x: (z, logits, w) = (x W_s^T + b_s, x W_r^T + b_r, shrink(x))."""
    return F.linear(x, W_s, b_s), F.linear(x, W_r, b_r), torch_shrink(x, A, A_bias, N, N_bias)
