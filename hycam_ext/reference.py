"""ReferenceHyCAM: HyCAM written the way the authors wrote it (a Python loop over specialists,
torch.stack, a weighted sum). It is the test oracle and the benchmark baseline: keep it plain."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._base import HyCAMParameters, route
from .config import HyCAMConfig


def reference_shrink(x, A, A_bias, N, N_bias) -> torch.Tensor:
    """w [T, K, r]: the authors' per-specialist chain of Linear layers, stacked."""
    outs = []
    for k in range(A.shape[0]):
        p = F.linear(x, A[k], None if A_bias is None else A_bias[k])
        outs.append(F.linear(p, N[k], None if N_bias is None else N_bias[k]))
    return torch.stack(outs, dim=1)


def reference_cam(h_in, a, z, w, B, b, g, scale: float, placement: int = 0) -> torch.Tensor:
    """The modulation given z and w: expand each specialist, silu, stack [T, K, d], weighted sum."""
    experts = torch.stack([F.silu(scale * F.linear(w[:, k], B[k], None if b is None else b[k]))
                           for k in range(B.shape[0])], dim=1)
    cam = 1 + F.silu(z) + (g.unsqueeze(-1) * experts).sum(dim=1)
    if placement == 0:
        return (h_in if a is None else h_in + a) * cam
    return h_in + a * cam


class ReferenceHyCAM(HyCAMParameters):
    """Pure-PyTorch HyCAM. forward(x, h, gumbel_noise=None) -> h * CAM(x)."""

    def __init__(self, cfg: HyCAMConfig, device=None, dtype=None):
        if isinstance(cfg, HyCAMConfig) and cfg.routing != "token":
            raise ValueError("ReferenceHyCAM: the authors' formulation routes per token "
                             "(routing='token'); HyCAMConfig(use_kernels=False) computes task "
                             "routing in plain PyTorch")
        super().__init__(cfg, device=device, dtype=dtype)

    def cam(self, x: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CAM(x) = 1 + silu(z) + sum_k g_k e_k, shape of x."""
        cfg = self.cfg
        lead = x.shape[:-1]
        x2 = x.reshape(-1, cfg.hidden_size)
        noise = None if gumbel_noise is None else gumbel_noise.reshape(-1, cfg.num_specialists)
        shared = F.silu(F.linear(x2, self.shared_weight, self.shared_bias))
        logits = F.linear(x2, self.router_weight, self.router_bias)
        g = route(logits, cfg.tau, cfg.hard, self.training, noise)
        self._record(logits, g, tuple(lead))
        outs = []
        for k in range(cfg.num_specialists):
            ab = None if self.A_bias is None else self.A_bias[k]
            nb = None if self.N_bias is None else self.N_bias[k]
            bb = None if self.B_bias is None else self.B_bias[k]
            u = F.linear(F.linear(F.linear(x2, self.A[k], ab), self.N[k], nb), self.B[k], bb)
            outs.append(F.silu(cfg.scaling * u))
        experts = torch.stack(outs, dim=1)                      # [T, K, d]
        specialised = (g.unsqueeze(-1) * experts).sum(dim=1)    # [T, d]
        return (1 + shared + specialised).reshape(x.shape)


    def forward(self, x: torch.Tensor, h: torch.Tensor,
                gumbel_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(x, h, gumbel_noise)
        self._compute_dtype(x)
        return h * self.cam(x, gumbel_noise)

    def placement_forward(self, x: torch.Tensor, residual: torch.Tensor, attn_out: torch.Tensor,
                          gumbel_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder-layer formula: residual (h_in + a) * CAM or attention h_in + a * CAM."""
        self._check_inputs(x, attn_out, gumbel_noise, h_name="attention output")
        self._check_inputs(x, residual, None, h_name="residual")
        cam = self.cam(x, gumbel_noise)
        if self.cfg.placement == "residual":
            return (residual + attn_out) * cam
        return residual + attn_out * cam
