"""The custom ops torch.ops.hycam.* (C++/CUDA kernels in csrc/), their fake (meta) kernels and
their autograd. Host-side argument checks live in csrc/api.cpp; this file is thin glue.

    shrink(x, A, A_bias, N, N_bias) -> (p, w)          p = A x + a, w = N p + n   [T, K, r]
    shrink_backward(dw, x, p, A, N) -> (dx, dA, dA_bias, dN, dN_bias)
    cam_forward(h_in, a, z, w, B, b, g, scale, placement) -> out                  [T, d]
    cam_backward(go, h_in, a, z, w, B, b, g, scale, placement) -> (d_main, dz, dg, dw, dB, db)

placement 0 ("residual"): out = (h_in + a) * c  (a may be None: out = h_in * c)
placement 1 ("attention"): out = h_in + a * c
c = 1 + silu(z) + sum_k g[:, k] * silu(scale * (B_k w_k + b_k)); specialists with g == 0 are
skipped (hard routing computes only the routed one).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_IMPORT_ERROR: Optional[BaseException] = None
try:
    from . import _C  # noqa: F401  (loads the library; registers torch.ops.hycam.*)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR = e


def kernels_available() -> bool:
    return _IMPORT_ERROR is None


def cuda_kernels_available() -> bool:
    return kernels_available() and bool(torch.ops.hycam.built_with_cuda())


def _require_kernels() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"hycam_ext: the compiled extension hycam_ext._C could not be loaded "
                           f"({_IMPORT_ERROR}); reinstall with `pip install --no-build-isolation .`")


# ---------------------------------------------------------------------------------------
# public wrappers (differentiable)
# ---------------------------------------------------------------------------------------
def shrink(x: torch.Tensor, A: torch.Tensor, A_bias: Optional[torch.Tensor], N: torch.Tensor,
           N_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """w = N (A x + a) + n for all K specialists in one pass over x: [T, d] -> [T, K, r]."""
    _require_kernels()
    return torch.ops.hycam.shrink(x, A, A_bias, N, N_bias)[1]


def cam(h_in: torch.Tensor, a: Optional[torch.Tensor], z: torch.Tensor, w: torch.Tensor,
        B: torch.Tensor, b: Optional[torch.Tensor], g: torch.Tensor, scale: float,
        placement: int = 0) -> torch.Tensor:
    """The fused CAM modulation (see the module docstring)."""
    _require_kernels()
    return torch.ops.hycam.cam_forward(h_in, a, z, w, B, b, g, float(scale), int(placement))


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
    def _cam_forward_fake(h_in, a, z, w, B, b, g, scale, placement):
        return torch.empty_like(h_in)

    @torch.library.register_fake("hycam::cam_backward")
    def _cam_backward_fake(go, h_in, a, z, w, B, b, g, scale, placement):
        K, d = B.shape[0], B.shape[1]
        return (torch.empty_like(h_in), torch.empty_like(z), torch.empty_like(g),
                torch.empty_like(w), torch.empty_like(B), B.new_empty(K, d))

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
        h_in, a, z, w, B, b, g, scale, placement = inputs
        ctx.scale, ctx.placement = scale, placement
        ctx.has_a, ctx.has_b = a is not None, b is not None
        ctx.save_for_backward(h_in, a, z, w, B, b, g)

    def _cam_backward(ctx, go):
        h_in, a, z, w, B, b, g = ctx.saved_tensors
        d_main, dz, dg, dw, dB, db = torch.ops.hycam.cam_backward(
            go, h_in, a, z, w, B, b, g, ctx.scale, ctx.placement)
        if ctx.placement == 0:
            d_h, d_a = d_main, (d_main if ctx.has_a else None)
        else:
            d_h, d_a = go, d_main
        # one gradient per op argument: h_in, a, z, w, B, b, g, scale, placement
        return d_h, d_a, dz, dw, dB, (db if ctx.has_b else None), dg, None, None

    torch.library.register_autograd("hycam::cam_forward", _cam_backward,
                                    setup_context=_cam_setup)
