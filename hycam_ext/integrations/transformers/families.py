"""The model families HyCAM goes into: one small entry per ``config.model_type``.

Each entry says how the family's decoder layer body runs, written as a function of

* ``layer``    the decoder layer (its submodules are the original ones),
* ``h``        the layer input (the residual stream, ``h_in`` in HyCAM.placement_forward),
* ``attend``   ``attend(x)`` runs the layer's attention on ``x`` with the layer's keyword
               arguments and returns its output,
* ``modulate`` ``modulate(x, h, a)`` applies the HyCAM placement to the residual stream ``h``,
               the attention branch ``a`` and the CAM input ``x``: ``residual`` placement
               ``(h + a) * CAM(x)``, ``attention`` placement ``h + a * CAM(x)``, and ``h + a``
               when the adapter is disabled (CAM = 1).

``x`` is always what the attention reads and ``a`` what the base layer adds to the residual
stream for the attention branch, so CAM = 1 is exactly the base layer. The body functions below
say, family by family, what ``x`` and ``a`` are. At conversion every patched layer is checked
against the original on a small random probe (:func:`verify_layers`), so a transformers release
that changes a layer is refused instead of computing something else.

Adding a family: if its layer is one of the bodies below, add its ``model_type`` to
``FAMILIES`` with that body and the layer's norm names; otherwise write a body (a few lines
mirroring the family's own decoder layer forward) and a test on a tiny random config.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn


def _ffn(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The feed-forward block (MoE blocks of older transformers return (out, router_logits);
    Mixtral calls it ``block_sparse_moe`` before transformers 5)."""
    mlp = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
    out = mlp(x)
    return out[0] if isinstance(out, tuple) else out


def pre_norm(layer, h, attend, modulate):
    """Llama-style pre-norm: x = input_layernorm(h), a = attn(x);
    out = h' + mlp(post_attention_layernorm(h')) with h' = modulate(x, h, a)."""
    x = layer.input_layernorm(h)
    h = modulate(x, h, attend(x))
    return h + _ffn(layer, layer.post_attention_layernorm(h))


def pre_norm_dropout(layer, h, attend, modulate):
    """Phi-3: pre-norm with residual dropouts: a = resid_attn_dropout(attn(x));
    out = h' + resid_mlp_dropout(mlp(post_attention_layernorm(h')))."""
    x = layer.input_layernorm(h)
    h = modulate(x, h, layer.resid_attn_dropout(attend(x)))
    return h + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(h)))


def pre_norm_scaled(layer, h, attend, modulate):
    """Granite: pre-norm with a residual multiplier m: a = attn(x) * m;
    out = h' + mlp(post_attention_layernorm(h')) * m."""
    m = layer.residual_multiplier
    x = layer.input_layernorm(h)
    h = modulate(x, h, attend(x) * m)
    return h + layer.mlp(layer.post_attention_layernorm(h)) * m


def sandwich_norm(layer, h, attend, modulate):
    """Gemma 2 / 3: norms before and after each block: x = input_layernorm(h),
    a = post_attention_layernorm(attn(x)) (the normalised attention output);
    out = h' + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h')))."""
    x = layer.input_layernorm(h)
    h = modulate(x, h, layer.post_attention_layernorm(attend(x)))
    return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def post_norm(layer, h, attend, modulate):
    """OLMo 2 / 3: norms after each block only: x = h (the attention reads the raw stream),
    a = post_attention_layernorm(attn(h)); out = h' + post_feedforward_layernorm(mlp(h'))."""
    h = modulate(h, h, layer.post_attention_layernorm(attend(h)))
    return h + layer.post_feedforward_layernorm(layer.mlp(h))


def parallel(layer, h, attend, modulate):
    """Cohere 1 / 2: attention and MLP read the same normalised input: x = input_layernorm(h),
    a = attn(x); out = modulate(x, h, a) + mlp(x)."""
    x = layer.input_layernorm(h)
    return modulate(x, h, attend(x)) + layer.mlp(x)


def gemma3_attention_kwargs(layer, kwargs: dict) -> dict:
    """Gemma 3 before transformers 5: the layer takes both rotary tables and hands its attention
    the local one on sliding-window layers, the global one otherwise."""
    if "position_embeddings_global" in kwargs:
        glob = kwargs.pop("position_embeddings_global")
        loc = kwargs.pop("position_embeddings_local", None)
        kwargs["position_embeddings"] = loc if layer.self_attn.is_sliding else glob
    return kwargs


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family's decoder layer runs with HyCAM inside."""
    body: Callable
    norms: Tuple[str, ...]            # the layer's norms (trained with cfg.train_layernorms)
    layer_class: str                  # the decoder layer's class name in transformers
    extra: Tuple[str, ...] = ()       # other submodules / attributes the body uses
    # the layer's keyword arguments -> the attention's, where a transformers version differs
    attention_kwargs: Optional[Callable] = None

    @property
    def formula(self) -> str:
        return (self.body.__doc__ or "").strip()

    def required(self) -> Tuple[str, ...]:
        return ("self_attn",) + self.norms + self.extra


_PRE = ("input_layernorm", "post_attention_layernorm")
_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
_POST = ("post_attention_layernorm", "post_feedforward_layernorm")


def _pre(layer_class: str, **kw) -> Family:
    return Family(pre_norm, _PRE, layer_class, **kw)


# model_type -> Family. Every entry is tested on a tiny random config (python_tests/hf_tiny.py).
FAMILIES: Dict[str, Family] = {
    "llama": _pre("LlamaDecoderLayer"),
    "mistral": _pre("MistralDecoderLayer"),
    "ministral": _pre("MinistralDecoderLayer"),
    "mixtral": _pre("MixtralDecoderLayer"),
    "qwen2": _pre("Qwen2DecoderLayer"),
    "qwen2_moe": _pre("Qwen2MoeDecoderLayer"),
    "qwen3": _pre("Qwen3DecoderLayer"),
    "qwen3_moe": _pre("Qwen3MoeDecoderLayer"),
    "gemma": _pre("GemmaDecoderLayer"),
    "smollm3": _pre("SmolLM3DecoderLayer"),
    "helium": _pre("HeliumDecoderLayer"),
    "glm": _pre("GlmDecoderLayer"),
    "starcoder2": _pre("Starcoder2DecoderLayer"),
    "phi3": Family(pre_norm_dropout, _PRE, "Phi3DecoderLayer",
                   extra=("resid_attn_dropout", "resid_mlp_dropout", "mlp")),
    "granite": Family(pre_norm_scaled, _PRE, "GraniteDecoderLayer",
                      extra=("residual_multiplier", "mlp")),
    "gemma2": Family(sandwich_norm, _SANDWICH, "Gemma2DecoderLayer", extra=("mlp",)),
    "gemma3_text": Family(sandwich_norm, _SANDWICH, "Gemma3DecoderLayer", extra=("mlp",),
                          attention_kwargs=gemma3_attention_kwargs),
    "olmo2": Family(post_norm, _POST, "Olmo2DecoderLayer", extra=("mlp",)),
    "olmo3": Family(post_norm, _POST, "Olmo3DecoderLayer", extra=("mlp",)),
    "cohere": Family(parallel, ("input_layernorm",), "CohereDecoderLayer", extra=("mlp",)),
    "cohere2": Family(parallel, ("input_layernorm",), "Cohere2DecoderLayer", extra=("mlp",)),
}


class UnsupportedArchitectureError(ValueError):
    """The model is not of a family the HyCAM integration knows how to patch."""


def supported_model_types() -> Tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def model_type_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def family_of(model: nn.Module, who: str = "get_hycam_model") -> Tuple[str, Family]:
    """``(model_type, Family)`` of ``model``, or UnsupportedArchitectureError saying how to add
    an entry."""
    mt = model_type_of(model)
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    if fam is None:
        raise UnsupportedArchitectureError(
            f"{who}: unsupported model {type(model).__name__} (model_type={mt!r}); supported "
            f"model types: {', '.join(supported_model_types())}. To add a family, add its "
            f"model_type to FAMILIES in hycam_ext/integrations/transformers/families.py with "
            f"the body that matches its decoder layer (or a new body mirroring that layer's "
            f"forward) and test it on a tiny random config")
    return mt, fam


# ---- the conversion probe --------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    return a is b or a == b


class _Capture:
    """Forward hooks that keep each decoder layer's inputs and output of one forward."""

    def __init__(self, layers):
        self.calls: Dict[int, tuple] = {}
        self.hooks = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                      for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            self.calls.setdefault(i, (args, dict(kwargs), output))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def probe_inputs(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A tiny deterministic batch for the probe: 2 sequences of 5 token ids, the first left-padded."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise UnsupportedArchitectureError("get_hycam_model: the model config has no vocab_size")
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    dev = next((p.device for p in model.parameters() if p.device.type != "meta"),
               torch.device("cpu"))
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}


def capture_layers(model: nn.Module, layers) -> Dict[int, tuple]:
    """Run the (unpatched) model once on the probe; each layer's (args, kwargs, output)."""
    cap = _Capture(layers)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(**probe_inputs(model), use_cache=False)
    finally:
        cap.remove()
        for m, t in modes.items():
            m.training = t
    return cap.calls


def verify_layers(model: nn.Module, layers, calls: Dict[int, tuple], model_type: str) -> None:
    """Every patched layer, with its fresh HyCAM (CAM = 1), must give the original layer's output
    bitwise on the captured probe inputs; otherwise raise (the caller undoes the patch)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                if i not in calls:
                    raise UnsupportedArchitectureError(
                        f"get_hycam_model: decoder layer {i} did not run in the probe forward "
                        f"({model_type}); cannot check the patched layer")
                args, kwargs, want = calls[i]
                got = layer(*args, **kwargs)
                if not _same(got, want):
                    raise UnsupportedArchitectureError(
                        f"get_hycam_model: the HyCAM-patched {type(layer).__name__} (layer {i}, "
                        f"model_type {model_type!r}) does not reproduce the original layer with "
                        f"CAM = 1 on a probe input; this transformers version "
                        f"changed the layer, so its entry in hycam_ext/integrations/transformers/"
                        f"families.py needs updating")
    finally:
        for m, t in modes.items():
            m.training = t
