"""HyCAM (kernel-backed), HyCAMAttention and the load-balancing loss."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from . import ops
from ._base import HyCAMParameters, route  # noqa: F401  (route is public: hycam_ext.route)
from .config import HyCAMConfig, Placement
from .routing_stats import aux_loss, check_scope, is_distributed, total


class HyCAM(HyCAMParameters):
    """out = h * CAM(x), computed by the hycam_ext kernels (CPU and CUDA).

    The kernels are required: without a loadable hycam_ext._C every forward raises
    ``KernelsUnavailableError`` saying why. ``cfg.use_kernels=False`` (or ``HYCAM_USE_REFERENCE=1``)
    asks for the torch path instead (torch_path.py: the same maths in plain PyTorch, dense over
    the specialists).

    The residual stream is ``h_in`` throughout (hycam_ext._base explains the names)."""

    def __init__(self, cfg: HyCAMConfig, device=None, dtype=None):
        super().__init__(cfg, device=device, dtype=dtype)

    def _use_kernels(self) -> bool:
        """Whether this layer computes on the kernels (subject to HYCAM_USE_REFERENCE); the
        torch path otherwise."""
        return self.cfg.use_kernels

    def _modulated_stream(self, x: torch.Tensor, h_in: torch.Tensor, a: Optional[torch.Tensor],
                          placement: Placement, gumbel_noise: Optional[torch.Tensor],
                          task_ids=None) -> torch.Tensor:
        """The layer: the residual stream h_in (with the attention output a, or None) modulated
        by CAM(x) per ``placement``; shaped like h_in."""
        cfg = self.cfg
        use_kernels = self._use_kernels()
        # GEMMs and the shrink run in the compute dtype (autocast's when active); the modulation
        # runs in the dtype of the residual stream h_in, so an fp32 stream under bf16 autocast
        # is not rounded to bf16 at every layer.
        compute_dtype = self._compute_dtype(x)
        stream_dtype = h_in.dtype
        lead = tuple(x.shape[:-1])
        d, K = cfg.hidden_size, cfg.num_specialists
        x2 = x.reshape(-1, d).to(compute_dtype)

        def cast(t, dtype=compute_dtype):
            return None if t is None else t.to(dtype)

        # the shared projection's bias b_s is added inside the CAM op (z_bias), whose backward
        # sums its gradient in the same pass over [T, d] (no separate dz.sum(0))
        task = cfg.routing == "task"
        # routing="task": no router rows (no router slot on the shrink)
        W_r = x2.new_empty(0, d) if task else cast(self.router_weight)
        z, logits, w = ops.projections(x2, cast(self.shared_weight), None, W_r,
                                       None if task else cast(self.router_bias), cast(self.A),
                                       cast(self.A_bias), cast(self.N), cast(self.N_bias),
                                       use_kernels=use_kernels)
        if task:
            logits = self.task_routing_logits(lead, task_ids).to(compute_dtype)
        noise = None if gumbel_noise is None else gumbel_noise.reshape(-1, K)
        g = route(logits, cfg.tau, cfg.hard, self.training, noise)
        self._record(logits, g, lead)
        out = ops.cam(h_in.reshape(-1, d), None if a is None else a.reshape(-1, d).to(stream_dtype),
                      z.to(stream_dtype), w.to(stream_dtype), cast(self.B, stream_dtype),
                      cast(self.B_bias, stream_dtype), g.to(stream_dtype), cfg.scaling, placement,
                      use_kernels=use_kernels, z_bias=cast(self.shared_bias, stream_dtype))
        return out.reshape(h_in.shape)

    def forward(self, x: torch.Tensor, h: torch.Tensor,
                gumbel_noise: Optional[torch.Tensor] = None, task_ids=None) -> torch.Tensor:
        """h * CAM(x) (h: the stream h_in). ``task_ids`` (routing="task"): [batch] or x's
        leading shape, or an int."""
        self._check_inputs(x, h, gumbel_noise)
        return self._modulated_stream(x, h, None, Placement.RESIDUAL, gumbel_noise, task_ids)

    def cam(self, x: torch.Tensor, gumbel_noise: Optional[torch.Tensor] = None,
            task_ids=None) -> torch.Tensor:
        """CAM(x) = 1 + silu(z) + sum_k g_k e_k itself, shaped like x (the stream h_in = 1)."""
        self._check_inputs(x, x, gumbel_noise)
        return self._modulated_stream(x, torch.ones_like(x), None, Placement.RESIDUAL,
                                      gumbel_noise, task_ids)

    def placement_forward(self, x: torch.Tensor, h_in: torch.Tensor, a: torch.Tensor,
                          gumbel_noise: Optional[torch.Tensor] = None,
                          task_ids=None) -> torch.Tensor:
        """(h_in + a) * CAM(x) or h_in + a * CAM(x), per cfg.placement (a: the attention
        output)."""
        self._check_inputs(x, a, gumbel_noise, h_name="attention output")
        self._check_inputs(x, h_in, None, h_name="residual")
        return self._modulated_stream(x, h_in, a, self.cfg.placement_enum, gumbel_noise, task_ids)


def _first_output(result) -> torch.Tensor:
    """The attention output inside what an attention module returned: the tensor itself, or the
    first item of a tuple (namedtuples included) or list."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        if len(result) == 0 or not isinstance(result[0], torch.Tensor):
            raise TypeError(f"HyCAMAttention: the attention returned a {type(result).__name__} "
                            f"whose first item is not a tensor")
        return result[0]
    raise TypeError(f"HyCAMAttention: the attention must return a tensor, or a tuple or list "
                    f"whose first item is the attention output, got {type(result).__name__}")


def _replace_first(result, new: torch.Tensor):
    """``result`` with its attention output replaced by ``new``, in the same structure: a tensor
    for a tensor, a tuple of the same type (a namedtuple keeps its fields) for a tuple, a list for
    a list."""
    if isinstance(result, torch.Tensor):
        return new
    rest = list(result[1:])
    if isinstance(result, list):
        return type(result)([new] + rest)
    if type(result) is tuple:
        return (new, *rest)
    if hasattr(result, "_fields"):   # namedtuple
        return type(result)(new, *rest)
    return type(result)((new, *rest))   # other tuple types (e.g. torch.return_types)


class HyCAMAttention(nn.Module):
    """Wraps an attention module: forward(x, *args, residual=None, gumbel_noise=None, **kw)
    returns what the attention returns, in the same structure, with the attention output
    replaced by the placement formula: a tensor when the attention returns a tensor, a tuple
    (of the same type: namedtuples keep their fields) or list with the first item replaced when
    it returns one. So unpack it as the wrapped module's own result, e.g. ``hidden = attn(...)``
    for an attention that returns a tensor (``hidden, *rest = attn(...)`` would split a tensor
    along its first, batch, dimension)."""

    def __init__(self, attention: nn.Module, cfg: HyCAMConfig, hycam_cls=HyCAM):
        super().__init__()
        if not callable(attention):
            raise TypeError("HyCAMAttention: attention must be a callable module")
        self.attention = attention
        self.hycam = hycam_cls(cfg)
        self.cfg = cfg
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor, *args, residual: Optional[torch.Tensor] = None,
                gumbel_noise: Optional[torch.Tensor] = None, **kwargs):
        """``residual``: the residual stream h_in (the layer input before the input layer norm)."""
        result = self.attention(x, *args, **kwargs)
        a = _first_output(result)
        h_in = residual
        if h_in is None:
            if self.cfg.placement_enum == Placement.RESIDUAL:
                raise ValueError("HyCAMAttention: residual (h_in, the layer input before the "
                                 "input layer norm) is required for placement='residual'")
            h_in = torch.zeros_like(a)
        if not self.adapter_enabled:  # CAM = 1: both placements give h_in + a
            h_out = h_in + a
        else:
            h_out = self.hycam.placement_forward(x, h_in, a, gumbel_noise)
        return _replace_first(result, h_out)


def _hycam_modules(modules_or_model) -> list:
    if isinstance(modules_or_model, nn.Module):
        return [m for m in modules_or_model.modules() if isinstance(m, HyCAMParameters)]
    return [m for item in modules_or_model
            for m in (item.modules() if isinstance(item, nn.Module) else [item])
            if isinstance(m, HyCAMParameters)]


def load_balancing_loss(modules_or_model: Union[nn.Module, Iterable[nn.Module]],
                        scope: Optional[str] = None) -> torch.Tensor:
    """Global L_aux = sum_k mean_t(g[t, k]) * mean_t(softmax(l[t])_k) over every routed token of
    every HyCAM module that ran a training forward (tokens with token_mask == 0 left out).
    Not multiplied by aux_loss_coef; 0 (a scalar) when no module has statistics.

    scope: "rank" (default from the modules' config, as the authors train: means over this
    process's tokens) or "global" (means over the tokens of every rank of the default process
    group, all-reduced with autograd-aware collectives; every rank must call it).

    In a model converted by an integration (``get_hycam_model``, PEFT) with aux_loss_coef > 0
    the model hands the router ``aux_loss_coef * dL_aux`` in backward by itself, whatever
    computes the loss; for such modules this returns the value without a graph (for logs), so
    adding it to a loss cannot count it twice."""
    mods = _hycam_modules(modules_or_model)
    if scope is None:
        scope = mods[0].cfg.aux_loss_scope if mods else "rank"
    check_scope(scope, "load_balancing_loss")
    stats = [m.last_stats for m in mods if m.last_stats is not None]
    if not stats:
        if scope == "global" and is_distributed():
            raise RuntimeError("load_balancing_loss(scope='global'): this rank has no routing "
                               "statistics, but every rank must contribute to the collective")
        return torch.zeros(())
    loss = aux_loss(total([s.sums() for s in stats]), scope)
    return loss.detach() if any(getattr(m, "aux_grad_from_model", False) for m in mods) else loss


ROUTER_PARAMETERS = ("router_weight", "router_bias", "task_logits")


def hycam_param_groups(model: nn.Module, lr: float, router_lr_scale: float = 1.0,
                       weight_decay: float = 0.0) -> list:
    """Optimizer parameter groups for a model with HyCAM layers: the routers' parameters
    (``router_weight``, ``router_bias``, ``task_logits``) at ``lr * router_lr_scale``, every other
    trainable parameter at ``lr``. A router learning-rate multiplier is beyond the paper (which
    trains everything at one rate): the router's gradient is small next to the specialists', so
    at one rate it barely moves (docs/quality.md)."""
    for name, v in (("lr", lr), ("router_lr_scale", router_lr_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"hycam_param_groups: {name} must be a positive number, got {v!r}")
    router, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (router if name.rsplit(".", 1)[-1] in ROUTER_PARAMETERS else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "hycam"}]
    if router:
        groups.append({"params": router, "lr": lr * router_lr_scale, "weight_decay": 0.0,
                       "name": "hycam_router"})
    return groups
