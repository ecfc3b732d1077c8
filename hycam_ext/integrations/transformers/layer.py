"""The patched decoder layer: the family's layer body with HyCAM between attention and MLP.

A patched layer's class is a dynamic subclass of its original class whose ``forward`` is
:func:`hycam_decoder_forward`; being a subclass, transformers' gradient checkpointing (4.57's
``__call__`` override or 5.x's class-level ``forward`` wrapper) applies to it unchanged."""
from __future__ import annotations

import inspect
from typing import Dict, Optional, Tuple

import torch

from ...modules import HyCAM, route
from ...routing_stats import RoutingStats
from .routing import STEP_KWARG, RoutingStep, SharedState


def hycam_decoder_forward(self, hidden_states, *args, **kwargs):
    """The family's layer body (families.py) with the HyCAM placement between attention and
    MLP: ``residual``: h = (h_in + a) * CAM(x); ``attention``: h = h_in + a * CAM(x)."""
    if args:
        names = self._hycam_positional_names
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward: too many positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward: got multiple values for {name!r}")
            kwargs[name] = value
    step: Optional[RoutingStep] = kwargs.pop(STEP_KWARG, None)
    if step is None and not self._hycam_shared.step_in_kwargs:
        step = self._hycam_shared.step
    family = self._hycam_family
    if family.attention_kwargs is not None:
        kwargs = family.attention_kwargs(self, kwargs)
    attn_kwargs = _accepted(self.self_attn, kwargs)

    def attend(x):
        out = self.self_attn(hidden_states=x, **attn_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def modulate(x, h_in, a):
        if self._hycam_shared.enabled:
            return _apply_placement(self, x, h_in, a, step)
        return h_in + a

    out = family.body(self, hidden_states, attend, modulate)
    return (out,) if self.__dict__.get("_hycam_tuple_output", False) else out


_ACCEPTS: Dict[type, Optional[frozenset]] = {}


def _accepted(attn: torch.nn.Module, kwargs: dict) -> dict:
    """The keyword arguments ``attn.forward`` takes: all of them when it has ``**kwargs``; else
    only its named parameters (older layers receive flags such as ``output_router_logits`` that
    they use themselves and do not pass on)."""
    cls = type(attn)
    names = _ACCEPTS.get(cls, False)
    if names is False:
        params = inspect.signature(cls.forward).parameters.values()
        names = (None if any(p.kind == p.VAR_KEYWORD for p in params)
                 else frozenset(p.name for p in params))
        _ACCEPTS[cls] = names
    return kwargs if names is None else {k: v for k, v in kwargs.items() if k in names}


def _apply_placement(layer, x, h_in, a, step: Optional[RoutingStep]):
    """HyCAM's placement formula on the residual stream h_in (hycam_ext._base: names); hands
    this call's routing to the step and the route tally."""
    cam: HyCAM = layer.hycam
    shared: SharedState = layer._hycam_shared
    idx = layer._hycam_layer_index
    cam.token_mask = None if step is None else step.token_mask
    cam.task_ids = shared.probe_task_ids if step is None else step.task_ids
    # under autocast the attention output may come back in the autocast dtype while the residual
    # stream stays in the model dtype; the base layer adds them with type promotion, so do we.
    dt = h_in.dtype
    x = x if x.dtype == dt else x.to(dt)
    a = a if a.dtype == dt else a.to(dt)
    h_out = cam.placement_forward(x, h_in, a)
    if cam.training:   # cam.last_stats is this call's
        sums = cam.last_stats.sums()
        first = True
        if step is not None:
            h_out, first = step.record(idx, sums, h_out)
        if shared.tally is not None and first:
            shared.tally.add(idx, sums)
    elif shared.tally is not None:
        shared.tally.add(idx, _eval_routing(cam, x).sums())
    return h_out


@torch.no_grad()
def _eval_routing(cam: HyCAM, x: torch.Tensor) -> RoutingStats:
    """The deterministic routes an eval forward of ``cam`` used (eval forwards record nothing)."""
    x2 = x.reshape(-1, x.shape[-1])
    if cam.cfg.routing == "task":
        logits = cam.task_routing_logits(tuple(x.shape[:-1])).float()
    else:
        w, b = cam.router_weight, cam.router_bias
        logits = torch.nn.functional.linear(x2, w.to(x2.dtype), b.to(x2.dtype)).float()
    g = route(logits, cam.cfg.tau, cam.cfg.hard, False)
    return RoutingStats.of(logits, g, cam.token_mask, tuple(x.shape[:-1]))


_PATCHED_CLASSES: Dict[type, type] = {}


def patched_class(orig: type) -> type:
    """``HyCAM<orig>``: ``orig`` with :func:`hycam_decoder_forward` (one class per original; the
    family's body is the layer's ``_hycam_family``)."""
    cls = _PATCHED_CLASSES.get(orig)
    if cls is None:
        cls = type(f"HyCAM{orig.__name__}", (orig,), {
            "forward": hycam_decoder_forward,
            "_hycam_original_class": orig,
            "__module__": __name__,
        })
        _PATCHED_CLASSES[orig] = cls
    return cls


def positional_names(orig: type) -> Tuple[str, ...]:
    """Names of the original forward's positional parameters after ``hidden_states``."""
    sig = inspect.signature(orig.forward)   # follows __wrapped__ (5.x checkpoint wrapper)
    names = []
    for p in list(sig.parameters.values())[2:]:  # skip self, hidden_states
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return tuple(names)
