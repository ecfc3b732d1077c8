"""The custom ops torch.ops.hycam.* (C++/CUDA kernels in csrc/), their fake (meta) kernels and
their autograd. Host-side argument checks live in csrc/api.cpp; this file is thin glue.

    shrink(x, A, A_bias, N, N_bias) -> (p, w)          p = A x + a, w = N p + n   [T, K, r]
    shrink_backward(dw, x, p, A, N) -> (dx, dA, dA_bias, dN, dN_bias)
    projections(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias) -> (z, logits, w)   (Python: the
        layer's three maps of x as one autograd node, the router riding on the shrink)
    cam_forward(h_in, a, z, w, B, b, g, scale, placement, z_bias=None) -> out     [T, d]
    cam_backward(go, h_in, a, z, w, B, b, g, scale, placement, z_bias=None)
        -> (d_main, dz, dg, dw, dB, db, dz_bias)     dz_bias = sum_t dz ([d]; empty without z_bias)

placement (config.Placement, an IntEnum; the ops take its int value):
    RESIDUAL = 0:  out = (h_in + a) * c  (a may be None: out = h_in * c)
    ATTENTION = 1: out = h_in + a * c
c = 1 + silu(z + z_bias) + sum_k g[:, k] * silu(scale * (B_k w_k + b_k)); specialists with g == 0
are skipped (hard routing computes only the routed one). z_bias (optional, [d]) is the shared
projection's bias: inside this op its gradient comes out of the CAM backward's pass over [T, d]
instead of a separate dz.sum(0).

Names: h_in is the residual stream (the layer's input, which the placement modulates), a the
attention output, x what the attention read (the CAM's input). Every wrapper here computes on
the kernels unless asked for the torch path (torch_path.py: the same maths in plain PyTorch).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ._extension import (KernelsUnavailableError, kernels_available, reference_requested,  # noqa: F401
                         require_kernels)
from .config import Placement
from .torch_path import torch_cam, torch_projections, torch_shrink


def cuda_kernels_available() -> bool:
    return kernels_available() and bool(torch.ops.hycam.built_with_cuda())


def _use_kernels(use_kernels: bool) -> bool:
    """The one place that decides the kernels vs the torch path: the torch path runs only when
    asked for (use_kernels=False, or HYCAM_USE_REFERENCE=1); otherwise missing kernels raise."""
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
        return torch_shrink(x, A, A_bias, N, N_bias)
    return torch.ops.hycam.shrink(x, A, A_bias, N, N_bias)[1]


def cam(h_in: torch.Tensor, a: Optional[torch.Tensor], z: torch.Tensor, w: torch.Tensor,
        B: torch.Tensor, b: Optional[torch.Tensor], g: torch.Tensor, scale: float,
        placement: Placement = Placement.RESIDUAL, use_kernels: bool = True,
        z_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused CAM modulation of the residual stream h_in (see the module docstring); z_bias
    [d] is added to z. placement: a Placement (or its int value)."""
    placement = Placement.of(placement)
    if not _use_kernels(use_kernels):
        return torch_cam(h_in, a, z, w, B, b, g, float(scale), placement, z_bias)
    return torch.ops.hycam.cam_forward(h_in, a, z, w, B, b, g, float(scale), int(placement), z_bias)


def projections(x: torch.Tensor, W_s: torch.Tensor, b_s: Optional[torch.Tensor], W_r: torch.Tensor,
                b_r: Optional[torch.Tensor], A: torch.Tensor, A_bias: Optional[torch.Tensor], N: torch.Tensor,
                N_bias: Optional[torch.Tensor], use_kernels: bool = True):
    """The three maps of x in a HyCAM layer: z = x W_s^T + b_s (shared CAM), logits = x W_r^T + b_r
    (router) and w = shrink(x) -> (z, logits, w).

    With the kernels this is one autograd node, and x is read by two GEMMs instead of three: the
    router rides on the grouped shrink as extra specialist slots (RouterSlots), and the shared
    projection is cuBLAS. In the backward the shrink's GEMMs give dx, dA and dW_r in one pass,
    and the shared projection's dx GEMM accumulates into that dx in its epilogue (beta = 1): no
    [T, d] gradient is added afterwards. ``logits`` may be a strided view (row stride > K_r)."""
    if not _use_kernels(use_kernels):
        return torch_projections(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias)
    z, logits, w = _Projections.apply(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias)[:3]
    return z, logits, w


# ---------------------------------------------------------------------------------------
# the router as extra shrink slots
# ---------------------------------------------------------------------------------------
_CONSTANTS: Dict[tuple, torch.Tensor] = {}


def _constant(kind: str, n, like: torch.Tensor) -> torch.Tensor:
    """S identities I_r flattened (kind "eyes", n = (S, r): [S * r * r]) or a zero scalar (kind
    "zero", n ignored) in like's dtype and device, made once and kept: every call of the layer
    needs them, and a fresh one is a kernel launch each time. Under torch.compile, or for fake /
    meta tensors, made in place (the compiler folds them; nothing traced is kept); during CUDA graph
    capture too (memory of the graph's private pool is not kept beyond it)."""
    def make():
        if kind == "eyes":
            S, r = n
            return torch.eye(r, dtype=like.dtype, device=like.device).expand(S, r, r).reshape(-1)
        return torch.zeros((), dtype=like.dtype, device=like.device)

    if (torch.compiler.is_compiling() or like.device.type == "meta"
            or type(like) not in (torch.Tensor, torch.nn.Parameter)    # fake, other subclasses
            or (like.is_cuda and torch.cuda.is_current_stream_capturing())):  # a graph's pool
        return make()
    key = (kind, n, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = _CONSTANTS[key] = make()
    return t


class RouterSlots(NamedTuple):
    """The router riding on the shrink: its K_r rows appended to the K specialists as
    S = ceil(K_r / r) extra slots, [K + S, r, ...] in all ("ext" tensors below). A slot's rows
    are W_r's (the last slot zero padded to r rows), its bias b_r (padded with zeros), its mix
    N = identity and its mix bias absent (zero), so the slots' w is exactly the router logits:
    w_ext[:, K:] flattened to [T, S * r] holds them in its first K_r columns. The padded rows
    compute zeros, and their gradient is never read. K_r = 0 (task routing): no slot, the
    weights pass through unchanged.

    The four extended weights are views of one packed buffer, written by one concatenation
    (``pack``; ``unpack`` gives the views): each starts ALIGN elements apart from the buffer's
    base, so the kernels' vector paths see the alignment a fresh tensor has."""
    K: int
    r: int
    Kr: int

    ALIGN = 32   # elements between packed tensors' starts: 64 bytes or more for every dtype

    @classmethod
    def of(cls, A: torch.Tensor, W_r: torch.Tensor) -> "RouterSlots":
        return cls(A.shape[0], A.shape[1], W_r.shape[0])

    @property
    def S(self) -> int:
        """The number of router slots."""
        return -(-self.Kr // self.r)

    @property
    def pad(self) -> int:
        """Zero rows after W_r's in the last slot."""
        return self.S * self.r - self.Kr

    def layout(self, d: int, has_ab: bool, has_nb: bool):
        """([(offset, shape) of A_ext, A_bias_ext, N_ext, N_bias_ext, None where absent], the
        packed buffer's length)."""
        K1, r = self.K + self.S, self.r
        out, n = [], 0
        for present, shape in ((True, (K1, r, d)), (has_ab, (K1, r)), (True, (K1, r, r)),
                               (has_nb, (K1, r))):
            if not present:
                out.append(None)
                continue
            n = -(-n // self.ALIGN) * self.ALIGN
            out.append((n, shape))
            n += math.prod(shape)
        return out, n

    def pack(self, W_r, b_r, A, A_bias, N, N_bias) -> torch.Tensor:
        """The packed buffer of (A_ext, A_bias_ext, N_ext, N_bias_ext), in one concatenation; a
        bias that is zero in every slot (absent everywhere) is left out (None when unpacked)."""
        K, r, S, pad = self.K, self.r, self.S, self.pad
        d = A.shape[2]
        has_ab, has_nb = A_bias is not None or b_r is not None, N_bias is not None
        zero = _constant("zero", 0, A)
        pieces = (
            [A, W_r, zero.expand(pad * d)],
            [zero.expand(K * r) if A_bias is None else A_bias,
             zero.expand(S * r) if b_r is None else b_r, zero.expand(pad if b_r is not None else 0)],
            [N, _constant("eyes", (S, r), N)],
            [N_bias, zero.expand(S * r)])
        slots = self.layout(d, has_ab, has_nb)[0]
        parts, at = [], 0
        for where, ts in zip(slots, pieces):
            if where is None:
                continue
            if where[0] > at:
                parts.append(zero.expand(where[0] - at))
            parts += [t.reshape(-1) for t in ts]
            at = where[0] + math.prod(where[1])
        return torch.cat(parts)

    def unpack(self, buf: torch.Tensor, d: int, has_ab: bool, has_nb: bool):
        """(A_ext, A_bias_ext, N_ext, N_bias_ext): views of the packed buffer (None: absent)."""
        return tuple(None if where is None else buf[where[0]:where[0] + math.prod(where[1])].view(where[1])
                     for where in self.layout(d, has_ab, has_nb)[0])

    def split(self, w_ext: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(w [T, K, r] contiguous, the kernels read it; logits [T, K_r], a view of w_ext)."""
        if self.S == 0:
            return w_ext, w_ext.new_empty(w_ext.shape[0], 0)
        T, K = w_ext.shape[0], self.K
        logits = w_ext[:, K:].reshape(T, self.S * self.r)[:, :self.Kr]
        return w_ext[:, :K].contiguous(), logits

    def join(self, dw: Optional[torch.Tensor], dlogits: Optional[torch.Tensor],
             like: torch.Tensor) -> torch.Tensor:
        """dw_ext [T, K + S, r] from the gradients of split's outputs (None: zero), one
        concatenation; the padded columns are zero."""
        T, K, r, S = like.shape[0], self.K, self.r, self.S
        if S == 0:
            return dw
        zero = _constant("zero", 0, like)
        parts = [zero.expand(T, K * r) if dw is None else dw.reshape(T, K * r),
                 zero.expand(T, S * r) if dlogits is None else dlogits,
                 zero.expand(T, self.pad if dlogits is not None else 0)]
        return torch.cat(parts, dim=1).view(T, K + S, r)

    def router_grads(self, dA_ext: torch.Tensor, dAb_ext: torch.Tensor):
        """(dW_r [K_r, d], db_r [K_r]): views of the slots' rows of the shrink's gradients."""
        S, r, Kr = self.S, self.r, self.Kr
        return (dA_ext[self.K:].reshape(S * r, dA_ext.shape[2])[:Kr],
                dAb_ext[self.K:].reshape(S * r)[:Kr])


class _Projections(torch.autograd.Function):
    """projections() on the kernels. Outputs (z, logits, w) and, for the backward only
    (non-differentiable), p_ext and the packed extended weights (RouterSlots): saved from the
    forward rather than built again."""

    @staticmethod
    def forward(x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias):
        slots = RouterSlots.of(A, W_r)
        if slots.S == 0:   # no slot: the weights are the inputs, saved as such
            packed, ext = None, (A, A_bias, N, N_bias)
        else:
            packed = slots.pack(W_r, b_r, A, A_bias, N, N_bias)
            ext = slots.unpack(packed, A.shape[2], A_bias is not None or b_r is not None,
                               N_bias is not None)
        p_ext, w_ext = torch.ops.hycam.shrink(x, *ext)
        w, logits = slots.split(w_ext)
        return torch.nn.functional.linear(x, W_s, b_s), logits, w, p_ext, packed

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W_s, b_s, W_r, b_r, A, A_bias, N, N_bias = inputs
        _, _, _, p_ext, packed = output
        ctx.slots = RouterSlots.of(A, W_r)
        ctx.has_bias = (b_s is not None, b_r is not None, A_bias is not None, N_bias is not None)
        if packed is None:
            ctx.save_for_backward(x, W_s, p_ext, A, N)
        else:
            ctx.save_for_backward(x, W_s, p_ext, packed)
            ctx.mark_non_differentiable(packed)
        ctx.mark_non_differentiable(p_ext)
        ctx.set_materialize_grads(False)  # an unused output: None, not a [T, d] tensor of zeros

    @staticmethod
    def backward(ctx, dz, dl, dw, *unused):
        x, W_s, p_ext, *weights = ctx.saved_tensors
        slots, need = ctx.slots, ctx.needs_input_grad
        if slots.S == 0:
            A_ext, N_ext = weights
        else:   # the biases' layout only places the others: has_ab, has_nb as in the forward
            A_ext, _, N_ext, _ = slots.unpack(weights[0], x.shape[1],
                                              ctx.has_bias[1] or ctx.has_bias[2], ctx.has_bias[3])
        K = slots.K
        dx = dA = dAb = dN = dNb = dW_r = db_r = None
        if slots.S == 0:
            dl = None   # no router rows: nothing to differentiate (K_r = 0)
        if dw is not None or dl is not None:
            dw_ext = slots.join(dw, dl, x)
            dx, dA_ext, dAb_ext, dN_ext, dNb_ext = torch.ops.hycam.shrink_backward(
                dw_ext, x, p_ext, A_ext, N_ext)
            dA, dAb, dN, dNb = dA_ext[:K], dAb_ext[:K], dN_ext[:K], dNb_ext[:K]
            if dl is not None:
                dW_r, db_r = slots.router_grads(dA_ext, dAb_ext)
                dW_r = dW_r if need[3] else None
                db_r = db_r if need[4] and ctx.has_bias[1] else None
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
# the CAM op's arguments, once: the schema's order (csrc/api.cpp, TORCH_LIBRARY; the fields of
# CamArgs in csrc/kernels.h). The autograd setup and backward below and the fake of the
# backward go by these names; python_tests/ops/test_op_args.py checks them against the
# registered schemas and the fakes' signatures.
# ---------------------------------------------------------------------------------------
CAM_ARGS = ("h_in", "a", "z", "w", "B", "b", "g", "scale", "placement", "z_bias")
CAM_TENSOR_ARGS = tuple(n for n in CAM_ARGS if n not in ("scale", "placement"))
# hycam.cam_backward's outputs, each named by what it is the gradient of ("main": of h_in under
# residual placement, of a under attention placement; the autograd backward hands it out)
CAM_BACKWARD_OUTS = ("main", "z", "g", "w", "B", "b", "z_bias")


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
        like = {"main": h_in, "z": z, "g": g, "w": w, "B": B}
        extra = {"b": B.new_empty(K, d), "z_bias": z.new_empty(d if z_bias is not None else 0)}
        return tuple(torch.empty_like(like[n]) if n in like else extra[n] for n in CAM_BACKWARD_OUTS)

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
        args = dict(zip(CAM_ARGS, inputs))
        ctx.scale, ctx.placement = args["scale"], args["placement"]
        ctx.present = {n: args[n] is not None for n in CAM_TENSOR_ARGS}
        ctx.save_for_backward(*(args[n] for n in CAM_TENSOR_ARGS))

    def _cam_backward(ctx, go):
        args = dict(zip(CAM_TENSOR_ARGS, ctx.saved_tensors), scale=ctx.scale, placement=ctx.placement)
        grad = dict(zip(CAM_BACKWARD_OUTS, torch.ops.hycam.cam_backward(go, *(args[n] for n in CAM_ARGS))))
        main = grad.pop("main")
        if ctx.placement == Placement.RESIDUAL:
            grad["h_in"], grad["a"] = main, main
        else:
            grad["h_in"], grad["a"] = go, main
        # one gradient per op argument, None for an absent tensor and for scale / placement
        return tuple(grad[n] if ctx.present.get(n) else None for n in CAM_ARGS)

    torch.library.register_autograd("hycam::cam_forward", _cam_backward,
                                    setup_context=_cam_setup)
