"""The custom ops torch.ops.hycam.* (C++/CUDA kernels in csrc/), their fake (meta) kernels and
their autograd. Host-side argument checks live in csrc/api.cpp; this file is thin glue.

    shrink(x, A, A_bias, N, N_bias) -> (p, w)          p = A x + a, w = N p + n   [T, K, r]
    shrink_backward(dw, x, p, A, N) -> (dx, dA, dA_bias, dN, dN_bias)
    projections(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias) -> (z, logits, w)   (Python: the
        layer's three maps of x as one autograd node, the router riding on the shrink)
    cam_forward(h_in, a, z, w, B, b, g, scale, placement, z_bias=None) -> out     [T, d]
    cam_backward(go, h_in, a, z, w, B, b, g, scale, placement, z_bias=None)
        -> (d_main, dz, dg, dw, dB, db, dz_bias)     dz_bias = sum_t dz ([d]; empty without z_bias)

placement 0 ("residual"): out = (h_in + a) * c  (a may be None: out = h_in * c)
placement 1 ("attention"): out = h_in + a * c
c = 1 + silu(z + z_bias) + sum_k g[:, k] * silu(scale * (B_k w_k + b_k)); specialists with g == 0
are skipped (hard routing computes only the routed one). z_bias (optional, [d]) is the shared
projection's bias: inside this op its gradient comes out of the CAM backward's pass over [T, d]
instead of a separate dz.sum(0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._extension import (KernelsUnavailableError, kernels_available, reference_requested,  # noqa: F401
                         require_kernels)


def cuda_kernels_available() -> bool:
    return kernels_available() and bool(torch.ops.hycam.built_with_cuda())


def _use_kernels(use_kernels: bool) -> bool:
    """The one place that decides kernels vs the pure-PyTorch formulation: the reference runs only
    when asked for (use_kernels=False, or HYCAM_USE_REFERENCE=1); otherwise missing kernels raise."""
    if not use_kernels or reference_requested():
        return False
    require_kernels()
    return True


# ---------------------------------------------------------------------------------------
# public wrappers (differentiable)
# ---------------------------------------------------------------------------------------
def shrink(x: torch.Tensor, A: torch.Tensor, A_bias: Optional[torch.Tensor], N: torch.Tensor,
           N_bias: Optional[torch.Tensor], use_kernels: bool = True) -> torch.Tensor:
    """w = N (A x + a) + n for all K specialists in one pass over x: [T, d] -> [T, K, r]."""
    if not _use_kernels(use_kernels):
        return _shrink_torch(x, A, A_bias, N, N_bias)
    return torch.ops.hycam.shrink(x, A, A_bias, N, N_bias)[1]


def cam(h_in: torch.Tensor, a: Optional[torch.Tensor], z: torch.Tensor, w: torch.Tensor,
        B: torch.Tensor, b: Optional[torch.Tensor], g: torch.Tensor, scale: float,
        placement: int = 0, use_kernels: bool = True,
        z_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused CAM modulation (see the module docstring); z_bias [d] is added to z."""
    if not _use_kernels(use_kernels):
        return _cam_torch(h_in, a, z, w, B, b, g, float(scale), int(placement), z_bias)
    return torch.ops.hycam.cam_forward(h_in, a, z, w, B, b, g, float(scale), int(placement), z_bias)


def projections(x: torch.Tensor, W_s: torch.Tensor, b_s: Optional[torch.Tensor], W_r: torch.Tensor,
                b_r: Optional[torch.Tensor], A: torch.Tensor, A_bias: Optional[torch.Tensor], N: torch.Tensor,
                N_bias: Optional[torch.Tensor], use_kernels: bool = True):
    """The three maps of x in a HyCAM layer: z = x W_s^T + b_s (shared CAM), logits = x W_r^T + b_r
    (router) and w = shrink(x) -> (z, logits, w).

    With the kernels this is one autograd node, and x is read by two GEMMs instead of three: the
    router rides on the grouped shrink as extra specialist slots (rows W_r, bias b_r, identity
    mix, so their w is exactly the logits), and the shared projection is cuBLAS. In the backward
    the shrink's GEMMs give dx, dA and dW_r in one pass, and the shared projection's dx GEMM
    accumulates into that dx in its epilogue (beta = 1): no [T, d] gradient is added afterwards."""
    if not _use_kernels(use_kernels):
        return F.linear(x, W_s, b_s), F.linear(x, W_r, b_r), _shrink_torch(x, A, A_bias, N, N_bias)
    z, logits, w, _ = _Projections.apply(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias)
    return z, logits, w


def _with_router(W_r, b_r, A, A_bias, N, N_bias):
    """The shrink's weights with the router appended as S = ceil(K_r / r) specialist slots: rows
    W_r (zero padded to S * r), bias b_r, mix N = identity, n = 0 (absent biases as zeros)."""
    K, r, d = A.shape
    Kr = W_r.shape[0]
    S = -(-Kr // r)
    pad = S * r - Kr
    zeros = A.new_zeros(K, r)
    A_ext = torch.cat([A, F.pad(W_r, (0, 0, 0, pad)).view(S, r, d)])
    b = b_r if b_r is not None else W_r.new_zeros(Kr)
    ab_ext = torch.cat([A_bias if A_bias is not None else zeros, F.pad(b, (0, pad)).view(S, r)])
    N_ext = torch.cat([N, torch.eye(r, dtype=N.dtype, device=N.device).expand(S, r, r)])
    nb_ext = torch.cat([N_bias if N_bias is not None else zeros, N.new_zeros(S, r)])
    return A_ext, ab_ext, N_ext, nb_ext


class _Projections(torch.autograd.Function):
    @staticmethod
    def forward(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias):
        K, Kr = A.shape[0], W_r.shape[0]
        p_ext, w_ext = torch.ops.hycam.shrink(x, *_with_router(W_r, b_r, A, A_bias, N, N_bias))
        logits = w_ext[:, K:].reshape(x.shape[0], (w_ext.shape[1] - K) * w_ext.shape[2])[:, :Kr].contiguous()
        return F.linear(x, W_s, b_s), logits, w_ext[:, :K].contiguous(), p_ext

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias = inputs
        ctx.has_bias = (b_s is not None, b_r is not None, A_bias is not None, N_bias is not None)
        ctx.save_for_backward(x, W_s, W_r, A, N, output[3])
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)  # an unused output: None, not a [T, d] tensor of zeros

    @staticmethod
    def backward(ctx, dz, dl, dw, dp_unused):
        x, W_s, W_r, A, N, p_ext = ctx.saved_tensors
        need = ctx.needs_input_grad
        T, (K, r, d), Kr = x.shape[0], A.shape, W_r.shape[0]
        dx = dA = dAb = dN = dNb = dW_r = db_r = None
        if dw is not None or dl is not None:
            dw_ext = x.new_zeros(T, p_ext.shape[1], r)
            if dw is not None:
                dw_ext[:, :K] = dw
            if dl is not None:
                dw_ext[:, K:].view(T, (p_ext.shape[1] - K) * r)[:, :Kr] = dl
            A_ext, _, N_ext, _ = _with_router(W_r, None, A, None, N, None)
            dx, dA_ext, dAb_ext, dN_ext, dNb_ext = torch.ops.hycam.shrink_backward(dw_ext, x, p_ext, A_ext, N_ext)
            dA, dAb, dN, dNb = dA_ext[:K], dAb_ext[:K], dN_ext[:K], dNb_ext[:K]
            if dl is not None:
                dW_r = dA_ext[K:].reshape((p_ext.shape[1] - K) * r, d)[:Kr] if need[3] else None
                db_r = dAb_ext[K:].reshape(-1)[:Kr] if need[4] and ctx.has_bias[1] else None
        if not need[0]:
            dx = None
        elif dz is not None:  # the shared projection's dx, accumulated in the GEMM (beta = 1)
            dx = dz.mm(W_s) if dx is None else dx.addmm_(dz, W_s)
        elif dx is None:
            dx = torch.zeros_like(x)
        dW_s = dz.t().mm(x) if dz is not None and need[1] else None
        db_s = dz.sum(0) if dz is not None and need[2] and ctx.has_bias[0] else None
        return (dx, dW_s, db_s, dW_r, db_r, dA, dAb if ctx.has_bias[2] else None, dN,
                dNb if ctx.has_bias[3] else None)


# ---------------------------------------------------------------------------------------
# the pure-PyTorch formulation, run only when asked for (use_kernels=False): dense over the
# specialists, so it materialises [T, K, d] tensors that the kernels never write
# ---------------------------------------------------------------------------------------
def _shrink_torch(x, A, A_bias, N, N_bias):
    p = torch.einsum("td,krd->tkr", x, A)
    if A_bias is not None:
        p = p + A_bias
    w = torch.einsum("tkr,kqr->tkq", p, N)
    return w if N_bias is None else w + N_bias


def _cam_torch(h_in, a, z, w, B, b, g, scale, placement, z_bias=None):
    u = torch.einsum("tkr,kdr->tkd", w, B)
    if b is not None:
        u = u + b
    if z_bias is not None:
        z = z + z_bias
    c = 1 + F.silu(z) + (g.unsqueeze(-1) * F.silu(scale * u)).sum(dim=1)
    if placement == 0:
        return (h_in if a is None else h_in + a) * c
    return h_in + a * c


# ---------------------------------------------------------------------------------------
# fake kernels (shapes only): torch.compile, meta tensors
# ---------------------------------------------------------------------------------------
if kernels_available():
    @torch.library.register_fake("hycam::shrink")
    def _shrink_fake(x, A, A_bias, N, N_bias):
        T, K, r = x.shape[0], A.shape[0], A.shape[1]
        return x.new_empty(T, K, r), x.new_empty(T, K, r)

    @torch.library.register_fake("hycam::shrink_backward")
    def _shrink_backward_fake(dw, x, p, A, N):
        K, r = A.shape[0], A.shape[1]
        return (torch.empty_like(x), torch.empty_like(A), A.new_empty(K, r),
                torch.empty_like(N), N.new_empty(K, r))

    @torch.library.register_fake("hycam::cam_forward")
    def _cam_forward_fake(h_in, a, z, w, B, b, g, scale, placement, z_bias=None):
        return torch.empty_like(h_in)

    @torch.library.register_fake("hycam::cam_backward")
    def _cam_backward_fake(go, h_in, a, z, w, B, b, g, scale, placement, z_bias=None):
        K, d = B.shape[0], B.shape[1]
        return (torch.empty_like(h_in), torch.empty_like(z), torch.empty_like(g),
                torch.empty_like(w), torch.empty_like(B), B.new_empty(K, d),
                z.new_empty(d if z_bias is not None else 0))

    # -----------------------------------------------------------------------------------
    # autograd
    # -----------------------------------------------------------------------------------
    def _shrink_setup(ctx, inputs, output):
        x, A, A_bias, N, N_bias = inputs
        p, _ = output
        ctx.has_bias = (A_bias is not None, N_bias is not None)
        ctx.save_for_backward(x, p, A, N)
        ctx.mark_non_differentiable(p)

    def _shrink_backward(ctx, dp_unused, dw):
        x, p, A, N = ctx.saved_tensors
        if dw is None:
            return None, None, None, None, None
        dx, dA, dAb, dN, dNb = torch.ops.hycam.shrink_backward(dw, x, p, A, N)
        return (dx, dA, dAb if ctx.has_bias[0] else None, dN, dNb if ctx.has_bias[1] else None)

    torch.library.register_autograd("hycam::shrink", _shrink_backward, setup_context=_shrink_setup)

    def _cam_setup(ctx, inputs, output):
        h_in, a, z, w, B, b, g, scale, placement, z_bias = inputs
        ctx.scale, ctx.placement = scale, placement
        ctx.has_a, ctx.has_b, ctx.has_zb = a is not None, b is not None, z_bias is not None
        ctx.save_for_backward(h_in, a, z, w, B, b, g, z_bias)

    def _cam_backward(ctx, go):
        h_in, a, z, w, B, b, g, z_bias = ctx.saved_tensors
        d_main, dz, dg, dw, dB, db, dzb = torch.ops.hycam.cam_backward(
            go, h_in, a, z, w, B, b, g, ctx.scale, ctx.placement, z_bias)
        if ctx.placement == 0:
            d_h, d_a = d_main, (d_main if ctx.has_a else None)
        else:
            d_h, d_a = go, d_main
        # one gradient per op argument: h_in, a, z, w, B, b, g, scale, placement, z_bias
        return (d_h, d_a, dz, dw, dB, (db if ctx.has_b else None), dg, None, None,
                (dzb if ctx.has_zb else None))

    torch.library.register_autograd("hycam::cam_forward", _cam_backward,
                                    setup_context=_cam_setup)
