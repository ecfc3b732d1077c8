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

Any training loop
-----------------
A loss computed elsewhere (TRL's fused LM head, a PeftModel, a hand-written loop on the logits)
never calls ``_StepAuxLoss``. So the decoder stack's output also passes through
:class:`_InjectAuxGrad`, an identity (as Megatron's MoEAuxLossAutoScaler) whose backward, if the
step's gradients have not been handed out yet, hands out those of
``aux_loss_coef * aux_grad_scale * L_aux``. It lies above every decoder layer and below any
loss, so it too runs before any ``_ReceiveAuxGrad``; when the loss did include L_aux (step 2 ran
first), it does nothing, so L_aux is never counted twice. ``aux_grad_scale`` (default 1) is for
losses that are divided by the gradient-accumulation steps after the fact (TRL, Trainer):
``HyCAMAuxLossCallback`` sets it to 1 / gradient_accumulation_steps.

The step reaches a recomputation through the layer's keyword arguments, which the checkpoint
keeps, so several forwards before one backward each find their own step. Without checkpointing
and with non-reentrant checkpointing the same path runs: one mechanism for the three modes.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch

from ...routing_stats import RoutingSums, aux_loss, total

# the decoder layer's keyword argument that carries the RoutingStep (popped before attention)
STEP_KWARG = "hycam_routing_step"


class RoutingStep:
    """One forward of the model: the token mask in, per-layer routing sums out, and on the way
    back the aux-loss gradient for those sums."""

    def __init__(self, num_layers: int, token_mask: Optional[torch.Tensor], task_ids=None):
        self.token_mask = token_mask                                   # [batch, seq] or None
        self.task_ids = task_ids                                       # routing="task": [batch]
        self.sums: List[Optional[RoutingSums]] = [None] * num_layers   # detached
        # layer index -> (dL/dS_g, dL/dS_q), set by _StepAuxLoss or _InjectAuxGrad.backward
        self.grads: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.grads_set = False

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


def _leaf_aux_loss(step: RoutingStep, scope: str):
    """L_aux of the step's stored sums, differentiable w.r.t. leaf copies of them: (the layer
    indices, the leaves' tensors in layer order (S_g, S_q per layer), L_aux)."""
    idx = step.layers()
    with torch.enable_grad():
        leaves = [RoutingSums(step.sums[i].g.detach().requires_grad_(),
                              step.sums[i].q.detach().requires_grad_(), step.sums[i].count)
                  for i in idx]
        loss = aux_loss(total(leaves), scope)
    return idx, [t for s in leaves for t in (s.g, s.q)], loss


def _set_grads(step: RoutingStep, idx, grads) -> None:
    step.grads = {i: (grads[2 * j], grads[2 * j + 1]) for j, i in enumerate(idx)}
    step.grads_set = True


class _StepAuxLoss(torch.autograd.Function):
    """L_aux of a step; ``anchor`` only orders the backward (see the module's design note)."""

    @staticmethod
    def forward(ctx, anchor, step: RoutingStep, scope: str):
        idx, inputs, loss = _leaf_aux_loss(step, scope)
        ctx.step, ctx.idx, ctx.loss, ctx.inputs = step, idx, loss, inputs
        ctx.anchor_meta = (anchor.dim() == 0, anchor.dtype, anchor.device)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        _set_grads(ctx.step, ctx.idx,
                   torch.autograd.grad(ctx.loss, ctx.inputs, grad, retain_graph=True))
        scalar, dt, dev = ctx.anchor_meta
        return (torch.zeros((), dtype=dt, device=dev) if scalar else None), None, None


def _hand_out_grads(step: RoutingStep, scope: str, weight: float) -> None:
    """Differentiate ``weight * L_aux`` of the step's stored sums; leave each layer's gradient in
    the step."""
    idx, inputs, loss = _leaf_aux_loss(step, scope)
    with torch.enable_grad():   # runs inside a backward, where grad mode is off
        _set_grads(step, idx, torch.autograd.grad(loss * weight, inputs))


class _InjectAuxGrad(torch.autograd.Function):
    """Identity on the decoder stack's output; backward hands the layers the gradient of
    ``weight * L_aux`` unless the loss already carried L_aux (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, step: RoutingStep, scope: str, weight: float):
        ctx.step, ctx.scope, ctx.weight = step, scope, weight
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.step.grads_set and ctx.step.has_stats():
            _hand_out_grads(ctx.step, ctx.scope, ctx.weight)
        return grad, None, None, None


def inject_aux_grad(hidden: torch.Tensor, step: RoutingStep, scope: str,
                    weight: float) -> torch.Tensor:
    """``hidden`` (the decoder stack's output), carrying the aux-loss gradient in backward."""
    if weight == 0.0 or not (torch.is_grad_enabled() and hidden.requires_grad):
        return hidden
    return _InjectAuxGrad.apply(hidden, step, scope, weight)


def step_aux_loss(step: RoutingStep, anchor: torch.Tensor, scope: str) -> torch.Tensor:
    """L_aux of the step's statistics; differentiable (through the layers) when ``anchor`` is."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _StepAuxLoss.apply(anchor, step, scope)
    return aux_loss(total([step.sums[i] for i in step.layers()]), scope)


class RouteTally:
    """Route distribution accumulated over many forwards (``HyCAMModel.collect_routing``)."""

    def __init__(self, num_layers: int):
        self.sums: List[Optional[torch.Tensor]] = [None] * num_layers   # [K] float32, CPU: sum g
        self.q_sums: List[Optional[torch.Tensor]] = [None] * num_layers  # sum softmax(logits)
        self.counts: List[float] = [0.0] * num_layers

    def add(self, idx: int, sums: RoutingSums) -> None:
        sg, sq = sums.g.detach().float().cpu(), sums.q.detach().float().cpu()
        self.sums[idx] = sg if self.sums[idx] is None else self.sums[idx] + sg
        self.q_sums[idx] = sq if self.q_sums[idx] is None else self.q_sums[idx] + sq
        self.counts[idx] += float(sums.count)

    def q_distribution(self, K: int) -> torch.Tensor:
        """[num_layers, K]: mean router probability softmax(l) per specialist (NaN rows: no tokens)."""
        return torch.stack([torch.full((K,), float("nan")) if s is None else s / max(c, 1.0)
                            for s, c in zip(self.q_sums, self.counts)])

    def aux_values(self) -> List[float]:
        """Per layer, L_aux of the collected tokens (NaN: no tokens)."""
        return [float("nan") if g is None else
                float(aux_loss(RoutingSums(g, q, torch.tensor(c))))
                for g, q, c in zip(self.sums, self.q_sums, self.counts)]

    def distribution(self, K: int) -> torch.Tensor:
        """[num_layers, K]: fraction of counted tokens per specialist (NaN rows: no tokens)."""
        return torch.stack([torch.full((K,), float("nan")) if s is None else s / max(c, 1.0)
                            for s, c in zip(self.sums, self.counts)])


class SharedState:
    """State shared by the wrapper and all patched layers of one model, and the decoder stack's
    hooks: every forward of the stack is a new RoutingStep, handed to the layers in their
    keyword arguments; its output carries the aux-loss gradient (module docstring)."""

    def __init__(self, num_layers: int, aux_loss_coef: float, aux_loss_scope: str):
        self.num_layers = num_layers
        self.aux_loss_coef = aux_loss_coef
        self.aux_loss_scope = aux_loss_scope
        self.aux_grad_scale = 1.0                 # see the module docstring
        self.enabled = True                       # False inside disable_adapter()
        self.step: Optional[RoutingStep] = None   # the latest forward's (routing_stats())
        self.tally: Optional[RouteTally] = None   # set inside collect_routing()
        self.log_aux = False                      # keep aux_log (HyCAMAuxLossCallback)
        self.aux_log: List[torch.Tensor] = []     # L_aux of training forwards since the last log
        self.step_in_kwargs = True                # see attach()
        self.task_ids = None                      # routing="task": this call's (HyCAMModel)
        self.probe_task_ids = None                # routing="task": the conversion probe's

    def new_step(self, token_mask: Optional[torch.Tensor]) -> RoutingStep:
        self.step = RoutingStep(self.num_layers, token_mask, self.task_ids)
        return self.step

    @contextlib.contextmanager
    def using_task_ids(self, task_ids):
        """The forwards inside the block route by ``task_ids`` (routing="task")."""
        prev, self.task_ids = self.task_ids, task_ids
        try:
            yield
        finally:
            self.task_ids = prev

    def attach(self, stack: torch.nn.Module, token_mask_fn) -> list:
        """Hooks on the decoder stack (``model.model``); returns their handles. A stack whose
        forward takes no ``**kwargs`` (a few older transformers models) cannot pass the step to
        its layers: they read ``self.step`` instead, which is the same step except under
        reentrant checkpointing with several forwards before one backward."""
        import inspect
        params = inspect.signature(type(stack).forward).parameters.values()
        self.step_in_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)

        def pre(module, args, kwargs):
            step = self.new_step(token_mask_fn(args, kwargs))
            if not self.step_in_kwargs:
                return None
            return args, dict(kwargs, **{STEP_KWARG: step})

        def post(module, args, kwargs, output):
            step = self.step
            if not (self.enabled and step is not None and step.has_stats()):
                return output
            if self.log_aux and len(self.aux_log) < 10_000:   # HyCAMAuxLossCallback reads it
                with torch.no_grad():
                    self.aux_log.append(aux_loss(total([step.sums[i] for i in step.layers()]),
                                                 self.aux_loss_scope))
            first = output[0] if isinstance(output, tuple) else output.last_hidden_state
            new = inject_aux_grad(first, step, self.aux_loss_scope,
                                  self.aux_loss_coef * self.aux_grad_scale)
            if new is first:
                return output
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            output.last_hidden_state = new
            return output

        return [stack.register_forward_pre_hook(pre, with_kwargs=True),
                stack.register_forward_hook(post, with_kwargs=True)]

    def pop_aux_log(self) -> Optional[float]:
        """Mean L_aux of the training forwards since the last call (None if there were none)."""
        vals, self.aux_log = self.aux_log, []
        return float(torch.stack([v.float().cpu() for v in vals]).mean()) if vals else None
