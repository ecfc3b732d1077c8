"""What every HyCAM layer shares: parameters, initialisation, input checks, routing and its
statistics. The layer itself is modules.HyCAM (on the kernels, or on the torch path of
torch_path.py; reference.ReferenceHyCAM is it on the torch path, the oracle).

Names. A decoder layer's residual stream is ``h_in`` wherever it flows through hycam_ext (the
ops' argument of that name, ``HyCAM.placement_forward``, ``HyCAM._modulated_stream``, the
integrations' ``_apply_placement``): the layer's input, to which the attention branch adds
``a`` and which the placement modulates, giving the layer's stream after attention. ``x`` is
what the attention read (the CAM's input). Public arguments keep their documented names:
``HyCAM.forward(x, h)`` (h * CAM(x)) and ``HyCAMAttention(..., residual=h_in)``."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .config import HyCAMConfig
from .routing_stats import RoutingStats


def sample_gumbel(like: torch.Tensor) -> torch.Tensor:
    """G ~ Gumbel(0, 1) from torch's RNG (so checkpoint recomputation reproduces it)."""
    return -torch.empty_like(like).exponential_().log()


def route(logits: torch.Tensor, tau: float, hard: bool, training: bool,
          gumbel_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routing weights g [T, K]: softmax((l + G) / tau), straight-through one-hot when hard.

    [T, K] is tiny next to the [T, d] work, so this stays in PyTorch (it fuses under
    torch.compile); the noise comes from torch's RNG, so checkpoint recomputation repeats it."""
    if training:
        noise = sample_gumbel(logits) if gumbel_noise is None else gumbel_noise.to(logits.dtype)
        y = torch.softmax((logits + noise) / tau, dim=-1)
    else:
        y = torch.softmax(logits / tau, dim=-1)
    if not hard:
        return y
    # straight through: one_hot - y.detach() + y, with the same values bit for bit in three
    # launches after the argmax: -y with 1 added at the argmax is (one_hot - y) exactly
    # (1 + (-y) == 1 - y in IEEE arithmetic), and no int64 one-hot is made and cast
    st = y.detach().neg().scatter_(-1, y.argmax(dim=-1, keepdim=True), 1.0, reduce="add")
    return st + y


class HyCAMParameters(nn.Module):
    """The parameters of docs/method.md ("Trainable parameters") with its identity initialisation
    (a fresh layer computes exactly the base layer)."""

    def __init__(self, cfg: HyCAMConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(cfg, HyCAMConfig):
            raise TypeError(f"cfg must be a hycam_ext.HyCAMConfig, got {type(cfg).__name__}")
        if cfg.hidden_size is None:
            raise ValueError("HyCAMConfig.hidden_size must be set for a standalone HyCAM module "
                             "(only the model integrations take it from the model)")
        self.cfg = cfg
        d, K, r = cfg.hidden_size, cfg.num_specialists, cfg.rank
        fk = {"device": device, "dtype": dtype}
        self.shared_weight = nn.Parameter(torch.empty(d, d, **fk))
        if cfg.routing == "task":
            # task routing (beyond the paper): logits per task instead of a router on x
            self.register_parameter("router_weight", None)
            self.register_parameter("router_bias", None)
            self.task_logits = nn.Parameter(torch.empty(cfg.num_tasks, K, **fk))
        else:
            self.router_weight = nn.Parameter(torch.empty(K, d, **fk))
            self.router_bias = nn.Parameter(torch.empty(K, **fk))
            self.register_parameter("task_logits", None)
        self.A = nn.Parameter(torch.empty(K, r, d, **fk))
        self.N = nn.Parameter(torch.empty(K, r, r, **fk))
        self.B = nn.Parameter(torch.empty(K, d, r, **fk))
        if cfg.bias:
            self.shared_bias = nn.Parameter(torch.empty(d, **fk))
            self.A_bias = nn.Parameter(torch.empty(K, r, **fk))
            self.N_bias = nn.Parameter(torch.empty(K, r, **fk))
            self.B_bias = nn.Parameter(torch.empty(K, d, **fk))
        else:
            self.register_parameter("shared_bias", None)
            self.register_parameter("A_bias", None)
            self.register_parameter("N_bias", None)
            self.register_parameter("B_bias", None)
        self.reset_parameters()
        # True (set by the model integrations): compute in the input's dtype whatever the
        # parameters' dtype (float32 master weights on a 16-bit base are cast per forward)
        self.compute_in_input_dtype = False
        # The routing of the last training forward, read by load_balancing_loss().
        self.last_stats: Optional[RoutingStats] = None
        # Which tokens of the next forwards count for the load-balancing loss: None (all) or a
        # tensor shaped like x without its last dim, nonzero = counted (e.g. not padding).
        self.token_mask: Optional[torch.Tensor] = None
        # routing="task": the task of each sequence (or token) of the next forwards: a [batch]
        # or x-leading-shaped LongTensor, or an int for all tokens (set per call by the
        # integrations; HyCAM.forward's task_ids argument takes precedence)
        self.task_ids = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.shared_weight)
        if self.task_logits is not None:
            nn.init.zeros_(self.task_logits)       # every task starts uniform over specialists
        else:
            # router: nn.Linear's default
            nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self.cfg.hidden_size)
            nn.init.uniform_(self.router_bias, -bound, bound)
        for k in range(self.cfg.num_specialists):
            nn.init.kaiming_uniform_(self.A[k], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.N[k], a=math.sqrt(5))
        nn.init.zeros_(self.B)
        for b in (self.shared_bias, self.A_bias, self.N_bias, self.B_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d={c.hidden_size}, K={c.num_specialists}, r={c.rank}, alpha={c.alpha}, "
                f"tau={c.tau}, hard={c.hard}, bias={c.bias}, placement={c.placement!r}")

    # ---- input checks shared by every forward -------------------------------------------
    def _check_inputs(self, x: torch.Tensor, h: torch.Tensor, gumbel_noise: Optional[torch.Tensor],
                      h_name: str = "h") -> None:
        d, K = self.cfg.hidden_size, self.cfg.num_specialists
        for name, t in (("x", x), (h_name, h)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"HyCAM: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[-1] != d:
                raise ValueError(f"HyCAM: {name} must have shape [..., {d}] (hidden_size), "
                                 f"got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"HyCAM: {name} must be a floating-point tensor, got {t.dtype}")
        if x.shape != h.shape:
            raise ValueError(f"HyCAM: x and {h_name} must have the same shape, "
                             f"got {tuple(x.shape)} and {tuple(h.shape)}")
        if x.dtype != h.dtype:
            raise TypeError(f"HyCAM: x and {h_name} must have the same dtype, got {x.dtype} and {h.dtype}")
        pdev = self.shared_weight.device
        for name, t in (("x", x), (h_name, h)):
            if t.device != pdev:
                raise ValueError(f"HyCAM: {name} is on {t.device} but the HyCAM parameters are on {pdev}")
        if gumbel_noise is not None:
            if not isinstance(gumbel_noise, torch.Tensor):
                raise TypeError("HyCAM: gumbel_noise must be a tensor or None")
            want = tuple(x.shape[:-1]) + (K,)
            if tuple(gumbel_noise.shape) != want:
                raise ValueError(f"HyCAM: gumbel_noise must have shape {want} ([..., num_specialists]), "
                                 f"got {tuple(gumbel_noise.shape)}")
            if gumbel_noise.device != x.device:
                raise ValueError(f"HyCAM: gumbel_noise is on {gumbel_noise.device}, x on {x.device}")
            if not gumbel_noise.is_floating_point():
                raise TypeError(f"HyCAM: gumbel_noise must be floating point, got {gumbel_noise.dtype}")

    def task_routing_logits(self, lead: Tuple[int, ...], task_ids=None) -> torch.Tensor:
        """routing="task": the [T, K] logits of T = prod(lead) tokens, each its task's row of
        ``task_logits``. ``task_ids``: [batch] (lead[0] == batch), the full leading shape, or an
        int; None takes ``self.task_ids``."""
        ids = self.task_ids if task_ids is None else task_ids
        n = self.cfg.num_tasks
        if ids is None:
            raise ValueError("HyCAM: routing='task' needs task_ids (a [batch] LongTensor of task "
                             "ids, one per sequence)")
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = torch.tensor(ids)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"HyCAM: task_ids must be an integer tensor or int, got "
                            f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
        ids = ids.to(self.task_logits.device)
        if ids.dim() == 0:
            ids = ids.expand(lead)
        elif tuple(ids.shape) != tuple(lead):
            if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:
                ids = ids.reshape((lead[0],) + (1,) * (len(lead) - 1)).expand(lead)
            else:
                raise ValueError(f"HyCAM: task_ids must have shape [{lead[0] if lead else 1}] (one "
                                 f"per sequence) or {tuple(lead)}, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"HyCAM: task_ids must be in [0, {n}) (num_tasks={n}), got values "
                             f"in [{int(ids.min())}, {int(ids.max())}]")
        return self.task_logits[ids.reshape(-1)]

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the layer computes in: autocast's if active, else the input's; parameters
        of another dtype are only accepted under autocast (as nn.Linear would be) or with
        ``compute_in_input_dtype``."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        if self.compute_in_input_dtype:
            return x.dtype
        if self.shared_weight.dtype != x.dtype:
            raise TypeError(f"HyCAM: x has dtype {x.dtype} but the HyCAM parameters are "
                            f"{self.shared_weight.dtype}; cast the module (.to(dtype)) or use autocast")
        return x.dtype

    def _record(self, logits: torch.Tensor, g: torch.Tensor,
                lead: Tuple[int, ...]) -> Optional[RoutingStats]:
        """Hold the routing of a training forward (the module keeps its last call's logits and
        g for the load-balancing loss); an eval forward leaves the held statistics alone."""
        if not self.training:
            return None
        self.last_stats = RoutingStats.of(logits, g, self.token_mask, lead)
        return self.last_stats

    # views of last_stats
    @property
    def last_router_logits(self) -> Optional[torch.Tensor]:
        return None if self.last_stats is None else self.last_stats.logits

    @property
    def last_routes(self) -> Optional[torch.Tensor]:
        return None if self.last_stats is None else self.last_stats.g

    @property
    def last_token_mask(self) -> Optional[torch.Tensor]:
        return None if self.last_stats is None else self.last_stats.token_mask
