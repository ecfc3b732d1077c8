"""Routing statistics of a Hugging Face model's forward, and the gradient of its L_aux.

One training forward of the model is one :class:`RoutingStep`. The pre-hook on the decoder stack
creates it and passes it to every decoder layer as the keyword argument ``STEP_KWARG`` (the
stack forwards its extra keyword arguments to the layers); each layer reads the token mask from
it and writes its routing sums into it; ``HyCAMModel.forward`` turns it into L_aux with
:func:`step_aux_loss`, which evaluates the one L_aux of ``hycam_ext.routing_stats``.

Design note: gradient checkpointing
-----------------------------------
L_aux couples the layers (the gradient for layer l's sums needs every layer's sums), so it can
only be formed after the last layer. Under *reentrant* checkpointing a layer's first forward runs
without autograd and the graph from its sums to its router exists only in the recomputation,
inside backward; L_aux cannot be an ordinary function of those graphs. So the gradient is
handed over through the step:

1. a layer stores its sums in the step, detached, and wraps its output in
   :class:`_ReceiveAuxGrad`, an identity whose backward gives the layer's (live) sums the
   gradient the step holds for that layer; in a recomputation this is the recomputed graph;
2. :class:`_StepAuxLoss` evaluates ``aux_loss`` on leaf copies of the stored sums and, in its
   backward, differentiates it (the global scope's all_reduce included) and leaves each layer's
   gradient in the step;
3. 2 runs before any 1: ``_StepAuxLoss`` also takes the task loss (or the logits) as an input
   and returns it a zero gradient, and autograd runs a node's backward only after every consumer
   of its output has run; the decoder layers all lie below the task loss.

The step reaches a recomputation through the layer's keyword arguments, which the checkpoint
keeps, so several forwards before one backward each find their own step. Without checkpointing
and with non-reentrant checkpointing the same path runs: one mechanism for the three modes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ...routing_stats import RoutingSums, aux_loss, total

# the decoder layer's keyword argument that carries the RoutingStep (popped before attention)
STEP_KWARG = "hycam_routing_step"


class RoutingStep:
    """One forward of the model: the token mask in, per-layer routing sums out, and on the way
    back the aux-loss gradient for those sums."""

    def __init__(self, num_layers: int, token_mask: Optional[torch.Tensor]):
        self.token_mask = token_mask                                   # [batch, seq] or None
        self.sums: List[Optional[RoutingSums]] = [None] * num_layers   # detached
        # layer index -> (dL/dS_g, dL/dS_q), set by _StepAuxLoss.backward
        self.grads: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def has_stats(self) -> bool:
        return any(s is not None for s in self.sums)

    def record(self, idx: int, sums: RoutingSums, h: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """Store layer ``idx``'s sums; returns the layer output (wrapped so that the aux-loss
        gradient reaches the sums) and whether this is the first forward of the layer in this
        step (False in a checkpoint recomputation)."""
        first = self.sums[idx] is None
        self.sums[idx] = RoutingSums(*(t.detach() for t in sums))
        if torch.is_grad_enabled() and (sums.g.requires_grad or sums.q.requires_grad):
            h = _ReceiveAuxGrad.apply(h, sums.g, sums.q, self, idx)
        return h, first

    def layers(self) -> List[int]:
        return [i for i, s in enumerate(self.sums) if s is not None]


class _ReceiveAuxGrad(torch.autograd.Function):
    """Identity on the layer output h; backward gives the layer's sums the step's gradient
    (none when the aux loss was not part of what is being differentiated)."""

    @staticmethod
    def forward(ctx, h, sum_g, sum_q, step: RoutingStep, idx: int):
        ctx.step, ctx.idx = step, idx
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        grad_g, grad_q = ctx.step.grads.get(ctx.idx, (None, None))
        return grad_h, grad_g, grad_q, None, None


class _StepAuxLoss(torch.autograd.Function):
    """L_aux of a step; ``anchor`` only orders the backward (see the module's design note)."""

    @staticmethod
    def forward(ctx, anchor, step: RoutingStep, scope: str):
        idx = step.layers()
        with torch.enable_grad():
            leaves = [RoutingSums(step.sums[i].g.detach().requires_grad_(),
                                  step.sums[i].q.detach().requires_grad_(), step.sums[i].count)
                      for i in idx]
            loss = aux_loss(total(leaves), scope)
        ctx.step, ctx.idx, ctx.loss, ctx.leaves = step, idx, loss, leaves
        ctx.anchor_meta = (anchor.dim() == 0, anchor.dtype, anchor.device)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        inputs = [t for s in ctx.leaves for t in (s.g, s.q)]
        grads = torch.autograd.grad(ctx.loss, inputs, grad, retain_graph=True)
        ctx.step.grads = {i: (grads[2 * j], grads[2 * j + 1]) for j, i in enumerate(ctx.idx)}
        scalar, dt, dev = ctx.anchor_meta
        return (torch.zeros((), dtype=dt, device=dev) if scalar else None), None, None


def step_aux_loss(step: RoutingStep, anchor: torch.Tensor, scope: str) -> torch.Tensor:
    """L_aux of the step's statistics; differentiable (through the layers) when ``anchor`` is."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _StepAuxLoss.apply(anchor, step, scope)
    return aux_loss(total([step.sums[i] for i in step.layers()]), scope)


class RouteTally:
    """Route distribution accumulated over many forwards (``HyCAMModel.collect_routing``)."""

    def __init__(self, num_layers: int):
        self.sums: List[Optional[torch.Tensor]] = [None] * num_layers   # [K] float32, CPU
        self.counts: List[float] = [0.0] * num_layers

    def add(self, idx: int, sum_g: torch.Tensor, count: torch.Tensor) -> None:
        sg = sum_g.detach().float().cpu()
        self.sums[idx] = sg if self.sums[idx] is None else self.sums[idx] + sg
        self.counts[idx] += float(count)

    def distribution(self, K: int) -> torch.Tensor:
        """[num_layers, K]: fraction of counted tokens per specialist (NaN rows: no tokens)."""
        return torch.stack([torch.full((K,), float("nan")) if s is None else s / max(c, 1.0)
                            for s, c in zip(self.sums, self.counts)])


class SharedState:
    """State shared by the wrapper and all patched layers of one model."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.enabled = True                       # False inside HyCAMModel.disable_adapter()
        self.step: Optional[RoutingStep] = None   # the latest forward's (routing_stats())
        self.tally: Optional[RouteTally] = None   # set inside HyCAMModel.collect_routing()

    def new_step(self, token_mask: Optional[torch.Tensor]) -> RoutingStep:
        self.step = RoutingStep(self.num_layers, token_mask)
        return self.step
