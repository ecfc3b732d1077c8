"""Hugging Face ``transformers`` integration: put one HyCAM per decoder layer of a Llama, Qwen2 or
Mistral causal LM, without forking the model files and without renaming any base weight.

How it is wired (see SPEC.md section 1):

* every decoder layer gets a submodule ``hycam`` (a :class:`hycam_ext.HyCAM`) and its class is
  swapped for a tiny dynamic subclass whose ``forward`` runs the same pre-norm block as the
  original, with the HyCAM placement between attention and MLP:
  ``residual``: ``h = (h_in + a) * CAM(x)``; ``attention``: ``h = h_in + a * CAM(x)``.
  Because it is a subclass, transformers' gradient checkpointing (4.57's ``__call__`` override or
  5.x's class-level ``forward`` wrapper) applies to it unchanged. ``unload()`` restores the class.
* a forward pre-hook on the decoder stack sets each HyCAM's ``token_mask`` from
  ``attention_mask`` so padding is left out of the load-balancing loss.
* the load-balancing loss is computed from per-layer routing sums gathered inside each layer.
  Its gradient reaches the router through a pair of autograd functions (one on the layer output,
  one on the loss), so it also works under reentrant gradient checkpointing, where the first
  forward runs without a graph and only the recomputation in backward has one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import types
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import HyCAMConfig
from ..modules import HyCAM, route

__all__ = ["get_hycam_model", "HyCAMModel", "UnsupportedArchitectureError", "HyCAMMergeError",
           "SUPPORTED_ARCHITECTURES", "ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME",
           "HyCAMSaveCallback", "HyCAMTrainer", "find_hycam_model"]

ADAPTER_WEIGHTS_NAME = "hycam_adapter.safetensors"
ADAPTER_CONFIG_NAME = "hycam_adapter_config.json"
FORMAT_VERSION = 1

# model class name -> decoder layer class name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
}


class UnsupportedArchitectureError(ValueError):
    """The model is not one of the architectures the HyCAM integration knows how to patch."""


class HyCAMMergeError(NotImplementedError):
    """HyCAM cannot be merged into the base weights."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("hycam_ext.integrations.transformers needs `transformers>=4.57`") from e
    return transformers


def _check_transformers_version() -> None:
    tf = _transformers()
    from packaging.version import Version
    if Version(tf.__version__).release < (4, 57):
        raise ImportError(f"hycam_ext's transformers integration needs transformers>=4.57, "
                          f"found {tf.__version__}")


# ---------------------------------------------------------------------------------------------
# load-balancing loss plumbing
# ---------------------------------------------------------------------------------------------
class _StepContext:
    """Routing statistics of one top-level forward, and the aux-loss gradient for them."""

    def __init__(self, num_layers: int, token_mask: Optional[torch.Tensor] = None):
        self.token_mask = token_mask                                     # [batch, seq] or None
        self.sum_g: List[Optional[torch.Tensor]] = [None] * num_layers   # [K] float32, detached
        self.sum_q: List[Optional[torch.Tensor]] = [None] * num_layers
        self.count: List[Optional[torch.Tensor]] = [None] * num_layers   # scalar float32
        self.grad_g: Optional[torch.Tensor] = None  # d(aux)/d(sum_g[l]), the same for every layer
        self.grad_q: Optional[torch.Tensor] = None

    def has_stats(self) -> bool:
        return any(s is not None for s in self.sum_g)

    def stacked(self):
        idx = [i for i, s in enumerate(self.sum_g) if s is not None]
        sg = torch.stack([self.sum_g[i] for i in idx])
        sq = torch.stack([self.sum_q[i] for i in idx])
        n = torch.stack([self.count[i] for i in idx])
        return idx, sg, sq, n


class _AttachRoutingStats(torch.autograd.Function):
    """Identity on the layer output; in backward it hands the routing sums of this layer the
    aux-loss gradient that _AuxLoss.backward left in the step context (None if it never ran)."""

    @staticmethod
    def forward(ctx, h, sum_g, sum_q, step):
        ctx.step = step
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        step = ctx.step
        return grad_h, step.grad_g, step.grad_q, None


class _AuxLoss(torch.autograd.Function):
    """L_aux = sum_k (sum_l Sg_l / N)_k (sum_l Sq_l / N)_k from detached per-layer sums.

    ``anchor`` (the task loss, or the logits) only orders the backward: this node runs before any
    decoder layer's backward, so the gradient it stores is there when the layers need it."""

    @staticmethod
    def forward(ctx, anchor, sum_g, sum_q, count, step, grad_scale=1.0):
        n = count.sum().clamp_min(1.0)
        G = sum_g.sum(0) / n
        Q = sum_q.sum(0) / n
        ctx.step = step
        ctx.grad_scale = grad_scale
        ctx.anchor_is_scalar = anchor.dim() == 0
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        ctx.save_for_backward(G, Q, n)
        return (G * Q).sum()

    @staticmethod
    def backward(ctx, grad_out):
        G, Q, n = ctx.saved_tensors
        scale = grad_out * ctx.grad_scale
        ctx.step.grad_g = (scale * Q / n).to(torch.float32)
        ctx.step.grad_q = (scale * G / n).to(torch.float32)
        grad_anchor = None
        if ctx.anchor_is_scalar:
            dt, dev = ctx.anchor_meta
            grad_anchor = torch.zeros((), dtype=dt, device=dev)
        return grad_anchor, None, None, None, None, None


def _global_sums(sg: torch.Tensor, sq: torch.Tensor, n: torch.Tensor):
    """aux_loss_scope='global': sum the per-layer statistics over the ranks of the default
    process group. The gradient each rank hands its local sums is then scaled by the world size,
    as hycam_ext.load_balancing_loss's autograd all_reduce does (DDP averages it back)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return sg, sq, n, 1.0
    L, K = sg.shape
    flat = torch.cat([sg.reshape(-1), sq.reshape(-1), n.reshape(-1).to(sg.dtype)])
    dist.all_reduce(flat)
    return (flat[:L * K].view(L, K), flat[L * K:2 * L * K].view(L, K), flat[2 * L * K:],
            float(dist.get_world_size()))


# ---------------------------------------------------------------------------------------------
# the patched decoder layer
# ---------------------------------------------------------------------------------------------
class _SharedState:
    """State shared by the wrapper and all patched layers of one model."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.enabled = True
        self.step: Optional[_StepContext] = None
        self.routing_accum: Optional[Dict[str, Any]] = None   # set by collect_routing()
        # id(tensor) -> (weakref(tensor), step): finds the forward a checkpoint recomputation
        # belongs to (its kwargs, e.g. the rotary position_embeddings, are those of that forward)
        self._steps_by_key: Dict[int, Tuple[Any, _StepContext]] = {}

    def new_step(self, token_mask: Optional[torch.Tensor]) -> _StepContext:
        self._steps_by_key = {k: v for k, v in self._steps_by_key.items() if v[0]() is not None}
        self.step = _StepContext(self.num_layers, token_mask)
        return self.step

    def step_for(self, key: Optional[torch.Tensor]) -> Optional[_StepContext]:
        if not isinstance(key, torch.Tensor):
            return self.step
        hit = self._steps_by_key.get(id(key))
        if hit is not None and hit[0]() is key:
            return hit[1]
        if self.step is not None:
            self._steps_by_key[id(key)] = (weakref.ref(key), self.step)
        return self.step


def _masked_sums(g: torch.Tensor, q: torch.Tensor, mask: Optional[torch.Tensor]):
    if mask is not None:
        keep = mask.reshape(-1, 1).to(device=g.device, dtype=g.dtype)
        return (g * keep).sum(0), (q * keep).sum(0), keep.sum()
    return g.sum(0), q.sum(0), torch.tensor(float(g.shape[0]), device=g.device)


def _hycam_decoder_forward(self, hidden_states, *args, **kwargs):
    """Pre-norm decoder layer with HyCAM between attention and MLP (replaces the original)."""
    if args:
        names = self._hycam_positional_names
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward: too many positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward: got multiple values for {name!r}")
            kwargs[name] = value
    shared: _SharedState = self._hycam_shared
    residual = hidden_states
    x = self.input_layernorm(hidden_states)
    attn = self.self_attn(hidden_states=x, **kwargs)
    a = attn[0] if isinstance(attn, tuple) else attn
    if not shared.enabled:
        h = residual + a
    else:
        pe = kwargs.get("position_embeddings")
        key = pe[0] if isinstance(pe, (tuple, list)) and pe else None
        h = self._hycam_apply(x, residual, a, shared.step_for(key))
    residual = h
    h = self.post_attention_layernorm(h)
    h = self.mlp(h)
    return residual + h


def _hycam_apply(self, x, residual, a, step: Optional[_StepContext]):
    cam: HyCAM = self.hycam
    shared: _SharedState = self._hycam_shared
    idx = self._hycam_layer_index
    dt = residual.dtype
    if step is not None:
        cam.token_mask = step.token_mask
    # under autocast the attention output may come back in the autocast dtype while the residual
    # stream stays in the model dtype; the base layer adds them with type promotion, so do we.
    x_ = x if x.dtype == dt else x.to(dt)
    a_ = a if a.dtype == dt else a.to(dt)
    h = cam.placement_forward(x_, residual, a_)
    mask = cam.token_mask
    if cam.training and cam.last_routes is not None and cam.last_router_logits is not None:
        g = cam.last_routes.float()
        q = torch.softmax(cam.last_router_logits.float(), dim=-1)
        sg, sq, n = _masked_sums(g, q, mask)
        first = step is None or step.sum_g[idx] is None   # False in a checkpoint recomputation
        if step is not None:
            step.sum_g[idx], step.sum_q[idx], step.count[idx] = sg.detach(), sq.detach(), n.detach()
            if torch.is_grad_enabled() and (sg.requires_grad or sq.requires_grad):
                h = _AttachRoutingStats.apply(h, sg, sq, step)
        acc = shared.routing_accum
        if acc is not None and first:
            _accumulate(acc, idx, sg.detach(), n.detach())
    elif shared.routing_accum is not None:
        with torch.no_grad():
            x2 = x_.reshape(-1, x_.shape[-1])
            w, b = cam.router_weight, cam.router_bias
            logits = torch.nn.functional.linear(x2, w.to(x2.dtype), b.to(x2.dtype)).float()
            g = route(logits, cam.cfg.tau, cam.cfg.hard, False)
            sg, _, n = _masked_sums(g, g, mask)
            _accumulate(shared.routing_accum, idx, sg, n)
    return h


def _accumulate(acc: Dict[str, Any], idx: int, sg: torch.Tensor, n: torch.Tensor) -> None:
    sums, counts = acc["sums"], acc["counts"]
    sg = sg.detach().float().cpu()
    n = float(n)
    sums[idx] = sg if sums[idx] is None else sums[idx] + sg
    counts[idx] += n


_PATCHED_CLASSES: Dict[type, type] = {}


def _patched_class(orig: type) -> type:
    cls = _PATCHED_CLASSES.get(orig)
    if cls is None:
        cls = type(f"HyCAM{orig.__name__}", (orig,), {
            "forward": _hycam_decoder_forward,
            "_hycam_apply": _hycam_apply,
            "_hycam_original_class": orig,
            "__module__": __name__,
        })
        _PATCHED_CLASSES[orig] = cls
    return cls


def _positional_names(orig: type) -> Tuple[str, ...]:
    sig = inspect.signature(orig.forward)   # follows __wrapped__ (5.x checkpoint wrapper)
    names = []
    for p in list(sig.parameters.values())[2:]:  # skip self, hidden_states
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# model output with the aux loss
# ---------------------------------------------------------------------------------------------
_AUX_OUTPUT_TYPES: Dict[type, type] = {}


def _output_type_with_aux(cls: type) -> type:
    """A dataclass subclass of the base model's output type with an ``aux_loss`` field. A real
    field (not a key added afterwards) keeps the output a valid pytree node: DDP with
    static_graph / find_unused_parameters flattens and rebuilds it as ``cls(**fields)``."""
    if "aux_loss" in getattr(cls, "__dataclass_fields__", {}):
        return cls
    t = _AUX_OUTPUT_TYPES.get(cls)
    if t is None:
        name = f"HyCAM{cls.__name__}"
        t = dataclasses.make_dataclass(
            name, [("aux_loss", Optional[torch.Tensor], dataclasses.field(default=None))],
            bases=(cls,), namespace={"__module__": __name__})
        globals().setdefault(name, t)   # picklable by qualified name
        _AUX_OUTPUT_TYPES[cls] = t
    return t


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def _architecture(model: nn.Module) -> str:
    tf = _transformers()
    for name in SUPPORTED_ARCHITECTURES:
        cls = getattr(tf, name, None)
        if cls is not None and isinstance(model, cls):
            return name
    kind = type(model).__name__
    mt = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedArchitectureError(
        f"get_hycam_model: unsupported model {kind}"
        + (f" (model_type={mt!r})" if mt else "")
        + f"; supported are {', '.join(SUPPORTED_ARCHITECTURES)} (pre-norm decoders whose layers "
        f"have input_layernorm / self_attn / post_attention_layernorm / mlp)")


def _decoder_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"get_hycam_model: {arch} without model.layers")
    want = SUPPORTED_ARCHITECTURES[arch]
    for i, layer in enumerate(layers):
        if getattr(layer, "_hycam_shared", None) is not None or hasattr(layer, "hycam"):
            raise ValueError("get_hycam_model: the model already has HyCAM layers; call unload() "
                             "first or load the adapter into a clean base model")
        if type(layer).__name__ != want:
            raise UnsupportedArchitectureError(
                f"get_hycam_model: layer {i} is {type(layer).__name__}, expected {want}")
        for attr in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not isinstance(getattr(layer, attr, None), nn.Module):
                raise UnsupportedArchitectureError(
                    f"get_hycam_model: layer {i} has no submodule {attr!r}")
    return layers


class HyCAMModel(nn.Module):
    """A causal LM with HyCAM in every decoder layer (returned by :func:`get_hycam_model`).

    Calls behave like the base model's (``model(input_ids=..., labels=...)``, ``generate``);
    in training mode the returned ``loss`` includes ``cfg.aux_loss_coef * L_aux`` and the output
    carries ``aux_loss`` (the unscaled L_aux). Attributes not found here come from the base model.
    """

    def __init__(self, model: nn.Module, cfg: HyCAMConfig):
        super().__init__()
        _check_transformers_version()
        if not isinstance(cfg, HyCAMConfig):
            raise TypeError(f"cfg must be a hycam_ext.HyCAMConfig, got {type(cfg).__name__}")
        arch = _architecture(model)
        layers = _decoder_layers(model, arch)
        hidden = int(model.config.hidden_size)
        cfg = dataclasses.replace(cfg, hidden_size=hidden)
        self.base_model = model
        self.hycam_config = cfg
        self._arch = arch
        self._shared = _SharedState(len(layers))
        self._requires_grad_backup = {n: p.requires_grad for n, p in model.named_parameters()}
        self._hooks = []
        self._enabled_input_grads = False
        self._unloaded = False

        for i, layer in enumerate(layers):
            if "forward" in layer.__dict__ and "_old_forward" not in layer.__dict__:
                raise UnsupportedArchitectureError(
                    f"get_hycam_model: decoder layer {i} has an instance-level forward set by "
                    f"another library (not an accelerate hook); cannot patch it")
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(layers):
            ref = layer.input_layernorm.weight
            orig = type(layer)
            cam = HyCAM(cfg, device=ref.device, dtype=ref.dtype)
            cam.train(layer.training)
            layer.hycam = cam
            layer._hycam_shared = self._shared
            layer._hycam_layer_index = i
            layer._hycam_positional_names = _positional_names(orig)
            layer.__class__ = _patched_class(orig)
            if "forward" in layer.__dict__:
                # accelerate's hooks (device_map / offload) put a wrapper on the instance that
                # calls ``_old_forward``, bound to the original class's forward: rebind it.
                layer._hycam_saved_old_forward = layer.__dict__["_old_forward"]
                layer._old_forward = types.MethodType(type(layer).forward, layer)
            if cfg.train_layernorms:
                for ln in (layer.input_layernorm, layer.post_attention_layernorm):
                    for p in ln.parameters():
                        p.requires_grad_(True)
        self._hooks.append(model.model.register_forward_pre_hook(self._pre_forward_hook,
                                                                 with_kwargs=True))

    # ---- plumbing --------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (HyCAM still inside); see unload() to remove HyCAM."""
        return self.base_model

    def _layers(self) -> nn.ModuleList:
        return self.base_model.model.layers

    def hycam_modules(self) -> List[HyCAM]:
        return [layer.hycam for layer in self._layers()]

    def _pre_forward_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        token_mask = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and ref is not None and ref.dim() >= 2:
            bsz, seq = ref.shape[0], ref.shape[1]
            if mask.shape[0] == bsz and mask.shape[1] >= seq:
                token_mask = mask[:, mask.shape[1] - seq:]
        for cam in self.hycam_modules():
            cam.token_mask = token_mask
        self._shared.new_step(token_mask)
        return None

    # ---- forward / generate ----------------------------------------------------------------
    # transformers.Trainer reads this: False makes it pass no ``num_items_in_batch`` and divide
    # the returned (per-micro-batch mean) loss by the accumulation steps itself. With True it
    # would expect a loss already normalised over the whole accumulated (and, across devices,
    # gathered) batch and would scale it by neither, so the aux term, a per-micro-batch mean,
    # would be counted grad_accum (x world size) times.
    accepts_loss_kwargs = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                *args, **kwargs):
        """The base model's forward (same arguments, named so that transformers.Trainer keeps
        the dataset columns); in training mode ``loss`` includes ``aux_loss_coef * L_aux`` and
        the output carries ``aux_loss``."""
        self._check_loaded()
        named = (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                 use_cache)
        if args:   # positional arguments past use_cache: keep the base model's order
            out = self.base_model(*named, *args, **kwargs)
        else:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  **kwargs)
        step = self._shared.step
        if not (self._shared.enabled and step is not None and step.has_stats()):   # training fwd
            return out
        _, sg, sq, n = step.stacked()
        scale = 1.0
        if self.hycam_config.aux_loss_scope == "global":
            sg, sq, n, scale = _global_sums(sg, sq, n)
        if isinstance(out, tuple):   # return_dict=False: (loss, logits, ...) or (logits, ...)
            has_loss = labels is not None and out[0].dim() == 0
            aux = _AuxLoss.apply(out[0], sg, sq, n, step, scale)
            if has_loss:
                out = (out[0] + self.hycam_config.aux_loss_coef * aux.to(out[0].dtype),) + out[1:]
            return out
        loss = getattr(out, "loss", None)
        anchor = loss if loss is not None else out.logits
        aux = _AuxLoss.apply(anchor, sg, sq, n, step, scale)
        fields = dict(out.items())
        if loss is not None:
            fields["loss"] = loss + self.hycam_config.aux_loss_coef * aux.to(loss.dtype)
        fields["aux_loss"] = aux
        if dataclasses.is_dataclass(out):
            return _output_type_with_aux(type(out))(**fields)
        for k, v in fields.items():
            out[k] = v
        return out

    def generate(self, *args, **kwargs):
        self._check_loaded()
        return self.base_model.generate(*args, **kwargs)

    def _check_loaded(self):
        if self._unloaded:
            raise RuntimeError("HyCAMModel: the adapter was unloaded; use the returned base model")

    # ---- routing statistics ----------------------------------------------------------------
    def routing_stats(self) -> Optional[torch.Tensor]:
        """[num_layers, K] mean route distribution (non-padding tokens) of the last training
        forward, or None."""
        step = self._shared.step
        if step is None or not step.has_stats():
            return None
        rows = []
        K = self.hycam_config.num_specialists
        for sg, n in zip(step.sum_g, step.count):
            rows.append(torch.full((K,), float("nan")) if sg is None
                        else (sg / n.clamp_min(1.0)).float().cpu())
        return torch.stack(rows)

    @contextlib.contextmanager
    def collect_routing(self):
        """Accumulate the route distribution of every forward inside the block (eval forwards
        use the deterministic eval routes). Yields a dict; after the block, ``result["dist"]``
        is a [num_layers, K] tensor (fraction of non-padding tokens per specialist)."""
        L, K = self._shared.num_layers, self.hycam_config.num_specialists
        acc = {"sums": [None] * L, "counts": [0.0] * L}
        prev = self._shared.routing_accum
        self._shared.routing_accum = acc
        result: Dict[str, Any] = {}
        try:
            yield result
        finally:
            self._shared.routing_accum = prev
            rows = [torch.full((K,), float("nan")) if s is None else s / max(c, 1.0)
                    for s, c in zip(acc["sums"], acc["counts"])]
            result["dist"] = torch.stack(rows)
            result["tokens"] = acc["counts"]

    # ---- adapter on/off ----------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block CAM = 1: the model computes exactly what the base model computes."""
        prev = self._shared.enabled
        self._shared.enabled = False
        try:
            yield self
        finally:
            self._shared.enabled = prev

    def merge_and_unload(self):
        raise HyCAMMergeError(
            "HyCAM cannot be merged into the base weights: it multiplies the layer's hidden state "
            "by CAM(x) = 1 + silu(W_s x + b_s) + sum_k g_k(x) silu(s B_k(N_k(A_k x + a_k) + n_k) + "
            "b_k), a gate that depends on the input token through non-linearities and a router, "
            "so no fixed change to any linear weight reproduces it (unlike LoRA's additive "
            "low-rank update). Keep the adapter (save_pretrained / from_pretrained), or call "
            "unload() to get the base model back.")

    def unload(self) -> nn.Module:
        """Remove HyCAM (modules, patched layer code, hooks) and return the original model."""
        self._check_loaded()
        for layer in self._layers():
            patched = type(layer)
            orig = layer._hycam_original_class
            layer.__class__ = orig
            del layer.hycam
            if "_hycam_saved_old_forward" in layer.__dict__:
                layer._old_forward = layer.__dict__["_hycam_saved_old_forward"]
            elif getattr(layer.__dict__.get("_old_forward"), "__func__", None) is patched.forward:
                layer._old_forward = types.MethodType(orig.forward, layer)   # hooked after us
            for attr in ("_hycam_shared", "_hycam_layer_index", "_hycam_positional_names",
                         "_hycam_saved_old_forward"):
                if attr in layer.__dict__:
                    delattr(layer, attr)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._enabled_input_grads and hasattr(self.base_model, "disable_input_require_grads"):
            self.base_model.disable_input_require_grads()
        for n, p in self.base_model.named_parameters():
            if n in self._requires_grad_backup:
                p.requires_grad_(self._requires_grad_backup[n])
        model = self.base_model
        self._unloaded = True
        return model

    # ---- training helpers ----------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      use_reentrant: Optional[bool] = None):
        kw = dict(gradient_checkpointing_kwargs or {})
        if use_reentrant is not None:
            kw["use_reentrant"] = use_reentrant
        kw.setdefault("use_reentrant", False)
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):          # transformers 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:                                                          # 4.57
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        # the frozen embeddings give inputs without grad: reentrant checkpointing would then cut
        # the graph, so make the embedding output require grad (what PEFT does too).
        if getattr(base, "_require_grads_hook", None) is None:
            base.enable_input_require_grads()
            self._enabled_input_grads = True

    def gradient_checkpointing_disable(self):
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.base_model.named_parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100.0 * trainable / max(total, 1):.4f}")

    # ---- save / load -------------------------------------------------------------------------
    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """HyCAM parameters (and the layer norms when cfg.train_layernorms), base-model names."""
        out = {}
        for name, p in self.base_model.named_parameters(remove_duplicate=False):
            parts = name.split(".")
            if ".hycam." in f".{name}" or (self.hycam_config.train_layernorms and len(parts) >= 2
                                           and parts[-2] in ("input_layernorm",
                                                             "post_attention_layernorm")
                                           and ".layers." in f".{name}"):
                out[name] = p
        return out

    def save_pretrained(self, save_directory: str, state_dict: Optional[Dict[str, Any]] = None,
                        is_main_process: bool = True, **_ignored) -> None:
        """Write the adapter only: ``hycam_adapter.safetensors`` + ``hycam_adapter_config.json``.

        ``state_dict``: take the tensors from this (full) state dict instead of the live
        parameters, e.g. the one gathered by ``accelerator.get_state_dict`` under FSDP / DeepSpeed
        ZeRO-3; keys may carry this wrapper's ``base_model.`` prefix or not.
        ``is_main_process=False`` writes nothing (the Trainer / accelerate convention)."""
        if not is_main_process:
            return
        from safetensors.torch import save_file
        own = self.adapter_state_dict()
        if state_dict is not None:
            picked = {}
            for k in own:
                for cand in (k, "base_model." + k, "module.base_model." + k):
                    if cand in state_dict:
                        picked[k] = state_dict[cand]
                        break
            missing = sorted(set(own) - set(picked))
            if missing:
                raise ValueError(f"HyCAMModel.save_pretrained: state_dict lacks adapter tensors, "
                                 f"e.g. {missing[:3]}")
            own = picked
        os.makedirs(save_directory, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in own.items()}
        save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt", "hycam_format_version": str(FORMAT_VERSION)})
        cfg = self.base_model.config
        from .. import __version__
        meta = {
            "format_version": FORMAT_VERSION,
            "adapter_type": "hycam",
            "hycam_ext_version": __version__,
            "hycam_config": self.hycam_config.to_dict(),
            "architecture": self._arch,
            "model_type": getattr(cfg, "model_type", None),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "hidden_size": int(cfg.hidden_size),
            "num_hidden_layers": len(self._layers()),
            "weights": ADAPTER_WEIGHTS_NAME,
        }
        with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    @staticmethod
    def _read_adapter_config(adapter_dir: str) -> Dict[str, Any]:
        cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"HyCAMModel.from_pretrained: no {ADAPTER_CONFIG_NAME} in "
                                    f"{adapter_dir!r}")
        with open(cfg_path) as f:
            meta = json.load(f)
        if meta.get("adapter_type") != "hycam":
            raise ValueError(f"{cfg_path} is not a HyCAM adapter config")
        return meta

    def load_adapter(self, adapter_dir: str) -> None:
        """Copy the weights of a saved adapter into this model's HyCAM parameters, in place (the
        optimizer keeps referring to the same tensors; used to resume from a checkpoint)."""
        from safetensors.torch import load_file
        meta = self._read_adapter_config(adapter_dir)
        if int(meta["num_hidden_layers"]) != len(self._layers()):
            raise ValueError(f"HyCAM adapter has {meta['num_hidden_layers']} layers, the base "
                             f"model {len(self._layers())}")
        saved_cfg = HyCAMConfig.from_dict(meta["hycam_config"])
        for f in ("num_specialists", "rank", "bias", "train_layernorms"):
            if getattr(saved_cfg, f) != getattr(self.hycam_config, f):
                raise ValueError(f"HyCAM adapter in {adapter_dir!r} has {f}="
                                 f"{getattr(saved_cfg, f)!r}, this model "
                                 f"{getattr(self.hycam_config, f)!r}")
        sd = load_file(os.path.join(adapter_dir, meta.get("weights", ADAPTER_WEIGHTS_NAME)))
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"HyCAM adapter does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"HyCAM adapter tensor {k}: shape {tuple(v.shape)}, the model "
                                 f"expects {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str,
                        is_trainable: bool = True) -> "HyCAMModel":
        meta = cls._read_adapter_config(adapter_dir)
        hcfg = HyCAMConfig.from_dict(meta["hycam_config"])
        mcfg = base_model.config
        if int(mcfg.hidden_size) != int(meta["hidden_size"]):
            raise ValueError(f"HyCAM adapter was trained for hidden_size {meta['hidden_size']}, "
                             f"the base model has {mcfg.hidden_size}")
        model = cls(base_model, hcfg)
        try:
            model.load_adapter(adapter_dir)
        except Exception:
            model.unload()
            raise
        if not is_trainable:
            for _, p in model.trainable_parameters():
                p.requires_grad_(False)
        return model


def find_hycam_model(model: Any) -> Optional[HyCAMModel]:
    """The HyCAMModel inside ``model`` (itself, or wrapped by DDP / accelerate / torch.compile
    through ``.module`` / ``._orig_mod``), or None."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, HyCAMModel):
            return model
        inner = None
        for attr in ("module", "_orig_mod"):
            if isinstance(model, nn.Module) and attr in getattr(model, "_modules", {}):
                inner = model._modules[attr]
                break
            if attr in getattr(model, "__dict__", {}):
                inner = model.__dict__[attr]
                break
        model, seen = inner, seen + 1
    return None


def __getattr__(name: str):
    # the Trainer pieces import transformers.Trainer (and accelerate): only on first use
    if name in ("HyCAMSaveCallback", "HyCAMTrainer"):
        from . import _trainer
        return getattr(_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_hycam_model(model: nn.Module, cfg: Optional[HyCAMConfig] = None) -> HyCAMModel:
    """Put a HyCAM (``cfg``; ``hidden_size`` is taken from the model config) in every decoder
    layer of a LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM, freeze the base model and
    return the :class:`HyCAMModel` wrapper. Base weight names are unchanged; the HyCAM parameters
    appear as ``model.layers.<i>.hycam.*``. A fresh conversion computes the base model exactly."""
    return HyCAMModel(model, cfg if cfg is not None else HyCAMConfig())
