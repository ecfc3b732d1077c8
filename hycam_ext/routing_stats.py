"""Routing statistics as data, and the one implementation of the load-balancing loss L_aux.

A training forward of a HyCAM layer yields a :class:`RoutingStats`: the router logits l [T, K]
and routing weights g [T, K] of that call, and which of its T tokens count (the token mask).
:meth:`RoutingStats.sums` reduces it to a :class:`RoutingSums`

    S_g = sum_t m_t g_t,   S_q = sum_t m_t softmax(l_t),   n = sum_t m_t        (m_t in {0, 1})

Sums add: over layers, over calls, over ranks. L_aux over any such union is therefore

    L_aux = sum_k (S_g / n)_k * (S_q / n)_k

and :func:`aux_loss` is the only place that computes it; ``hycam_ext.load_balancing_loss`` (from
the statistics the modules hold) and the Hugging Face integration (from the statistics each
decoder layer hands on, see ``integrations/transformers/routing.py``) both call it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

SCOPES = ("rank", "global")


class RoutingSums(NamedTuple):
    """Token sums of one or more RoutingStats (at least float32): all L_aux needs."""
    g: torch.Tensor       # [K]  sum over counted tokens of g
    q: torch.Tensor       # [K]  sum over counted tokens of softmax(l)
    count: torch.Tensor   # []   number of counted tokens


class RoutingStats(NamedTuple):
    """The routing of one training forward of one HyCAM layer."""
    logits: torch.Tensor                 # [T, K] router logits l (autograd graph kept)
    g: torch.Tensor                      # [T, K] routing weights (autograd graph kept)
    token_mask: Optional[torch.Tensor]   # [T], nonzero = the token counts; None: all count

    @classmethod
    def of(cls, logits: torch.Tensor, g: torch.Tensor, token_mask: Optional[torch.Tensor],
           lead: Tuple[int, ...]) -> "RoutingStats":
        """``token_mask`` has the leading shape ``lead`` of the layer's input x; flattened here."""
        if token_mask is not None:
            if tuple(token_mask.shape) != tuple(lead):
                raise ValueError(f"HyCAM.token_mask must have shape {tuple(lead)} (the leading "
                                 f"dims of x), got {tuple(token_mask.shape)}")
            token_mask = token_mask.reshape(-1).to(device=logits.device)
        return cls(logits, g, token_mask)

    def sums(self) -> RoutingSums:
        """Masked token sums. No boolean indexing: the number of kept tokens never has to reach
        the host, so this queues device work only (no device-to-host sync)."""
        dt = torch.promote_types(self.g.dtype, torch.float32)
        g = self.g.to(dt)
        q = torch.softmax(self.logits.to(dt), dim=-1)
        if self.token_mask is None:
            return RoutingSums(g.sum(0), q.sum(0), g.new_full((), float(g.shape[0])))
        keep = (self.token_mask != 0).unsqueeze(-1)
        # where() rather than a product with the mask: a padded token's values are not used
        # by anything else and may be non-finite, and 0 * inf would poison the sum
        zero = g.new_zeros(())
        return RoutingSums(torch.where(keep, g, zero).sum(0), torch.where(keep, q, zero).sum(0),
                           keep.sum(dtype=dt))


def total(parts: Sequence[RoutingSums]) -> RoutingSums:
    """The sums of the union of the token sets (in the widest dtype among the parts)."""
    if not parts:
        raise ValueError("total: no routing sums")
    dt = functools.reduce(torch.promote_types, [p.g.dtype for p in parts])
    return RoutingSums(*(torch.stack([p[i].to(dt) for p in parts]).sum(0) for i in range(3)))


def check_scope(scope: str, who: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"{who}: scope must be 'rank' or 'global', got {scope!r}")


def is_distributed() -> bool:
    """True when the default process group has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def aux_loss(sums: RoutingSums, scope: str = "rank") -> torch.Tensor:
    """L_aux = sum_k (S_g / n)_k (S_q / n)_k; 0 when no token counts.

    scope "rank": this process's tokens. "global": the sums of every rank of the default process
    group, added with an autograd-aware all_reduce (its backward sums the ranks' gradients,
    which DDP then averages); every rank must call it, in forward and in backward."""
    check_scope(scope, "aux_loss")
    g, q, n = sums
    if scope == "global" and is_distributed():
        from torch.distributed.nn.functional import all_reduce
        K = g.shape[-1]
        flat = all_reduce(torch.cat([g, q, n.reshape(1).to(g.dtype)]))
        g, q, n = flat[:K], flat[K:2 * K], flat[2 * K]
    n = n.clamp_min(1.0)
    return ((g / n) * (q / n)).sum()
