"""Which models HyCAM goes into, and how it goes in and comes out of their decoder layers."""
from __future__ import annotations

import types

import torch.nn as nn

from ...config import HyCAMConfig
from ...modules import HyCAM
from .layer import patched_class, positional_names
from .routing import SharedState

# model class name -> decoder layer class name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
}

# what a patched layer carries besides its ``hycam`` submodule (removed again by eject)
_LAYER_ATTRS = ("_hycam_shared", "_hycam_layer_index", "_hycam_positional_names",
                "_hycam_saved_old_forward")


class UnsupportedArchitectureError(ValueError):
    """The model is not one of the architectures the HyCAM integration knows how to patch."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("hycam_ext.integrations.transformers needs `transformers>=4.57`") from e
    return transformers


def check_transformers_version() -> None:
    tf = _transformers()
    from packaging.version import Version
    if Version(tf.__version__).release < (4, 57):
        raise ImportError(f"hycam_ext's transformers integration needs transformers>=4.57, "
                          f"found {tf.__version__}")


def architecture(model: nn.Module) -> str:
    """The supported architecture ``model`` is an instance of (a key of SUPPORTED_ARCHITECTURES)."""
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


def decoder_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    """``model.model.layers``, checked to be unpatched layers of the architecture's layer class."""
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
        if "forward" in layer.__dict__ and "_old_forward" not in layer.__dict__:
            raise UnsupportedArchitectureError(
                f"get_hycam_model: decoder layer {i} has an instance-level forward set by "
                f"another library (not an accelerate hook); cannot patch it")
    return layers


def inject(layer: nn.Module, index: int, cfg: HyCAMConfig, shared: SharedState) -> None:
    """Give ``layer`` a HyCAM (on the layer's device and dtype) and the patched class."""
    ref = layer.input_layernorm.weight
    orig = type(layer)
    cam = HyCAM(cfg, device=ref.device, dtype=ref.dtype)
    cam.train(layer.training)
    layer.hycam = cam
    layer._hycam_shared = shared
    layer._hycam_layer_index = index
    layer._hycam_positional_names = positional_names(orig)
    layer.__class__ = patched_class(orig)
    if "forward" in layer.__dict__:
        # accelerate's hooks (device_map / offload) put a wrapper on the instance that
        # calls ``_old_forward``, bound to the original class's forward: rebind it.
        layer._hycam_saved_old_forward = layer.__dict__["_old_forward"]
        layer._old_forward = types.MethodType(type(layer).forward, layer)
    if cfg.train_layernorms:
        for ln in (layer.input_layernorm, layer.post_attention_layernorm):
            for p in ln.parameters():
                p.requires_grad_(True)


def eject(layer: nn.Module) -> None:
    """Undo :func:`inject`: the original class, no HyCAM, accelerate's hook rebound."""
    patched = type(layer)
    orig = layer._hycam_original_class
    layer.__class__ = orig
    del layer.hycam
    if "_hycam_saved_old_forward" in layer.__dict__:
        layer._old_forward = layer.__dict__["_hycam_saved_old_forward"]
    elif getattr(layer.__dict__.get("_old_forward"), "__func__", None) is patched.forward:
        layer._old_forward = types.MethodType(orig.forward, layer)   # hooked after us
    for attr in _LAYER_ATTRS:
        if attr in layer.__dict__:
            delattr(layer, attr)
