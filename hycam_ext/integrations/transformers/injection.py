"""How HyCAM goes into and comes out of a model's decoder layers (which families: families.py)."""
from __future__ import annotations

import dataclasses
import types
from typing import Tuple

import torch
import torch.nn as nn

from ...config import HyCAMConfig
from ...modules import HyCAM
from .families import (Family, UnsupportedArchitectureError, capture_layers, family_of,
                       verify_layers)
from .layer import patched_class, positional_names
from .routing import SharedState

# what a patched layer carries besides its ``hycam`` submodule (removed again by eject)
_LAYER_ATTRS = ("_hycam_shared", "_hycam_layer_index", "_hycam_positional_names",
                "_hycam_saved_old_forward", "_hycam_tuple_output", "_hycam_family")


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


def decoder_layers(model: nn.Module, model_type: str, family: Family,
                   who: str = "get_hycam_model") -> nn.ModuleList:
    """``model.model.layers``, checked to be unpatched layers of the family's layer class."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{who}: {type(model).__name__} ({model_type}) has no decoder layers at model.layers")
    if has_hycam_layers(model):
        raise ValueError(f"{who}: the model already has HyCAM layers; call unload() first or "
                         f"load the adapter into a clean base model")
    for i, layer in enumerate(layers):
        if type(layer).__name__ != family.layer_class:
            raise UnsupportedArchitectureError(
                f"{who}: layer {i} is {type(layer).__name__}, expected {family.layer_class} "
                f"for model_type {model_type!r}")
        for attr in family.required():
            if not hasattr(layer, attr):
                raise UnsupportedArchitectureError(
                    f"{who}: layer {i} ({type(layer).__name__}) has no {attr!r}")
        if "forward" in layer.__dict__ and "_old_forward" not in layer.__dict__:
            raise UnsupportedArchitectureError(
                f"{who}: decoder layer {i} has an instance-level forward set by another library "
                f"(not an accelerate hook); cannot patch it")
    return layers


def has_hycam_layers(model: nn.Module) -> bool:
    """True when some module of ``model`` is a HyCAM-patched decoder layer (whichever entry point,
    ``get_hycam_model`` or PEFT, put it there)."""
    return any(getattr(m, "_hycam_shared", None) is not None
               or isinstance(getattr(m, "hycam", None), HyCAM) for m in model.modules())


def _param_dtype(layer: nn.Module, cfg: HyCAMConfig) -> torch.dtype:
    """float32 master weights by default; ``cfg.param_dtype == "base"``: the layer's own floating
    dtype (that of its first floating-point parameter, e.g. a norm of a quantised layer)."""
    if cfg.param_dtype == "float32":
        return torch.float32
    for p in layer.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# bitsandbytes (seen with 0.50.2) on a CPU with AVX512-BF16: a Linear4bit's first forward in eval
# mode without grad repacks its weight, for good, into a CPU inference layout whose kernel
# (gemv_4bit) has no autograd; a backward through it afterwards drops the gradient w.r.t. the
# layer input (only a UserWarning says so), so every HyCAM below it gets a wrong gradient. The
# conversion probe is such a forward. So the converted layers keep the training layout: the
# repacking is turned off in them (back on at unload), and one done before (an eval forward of
# the user's) is undone with bitsandbytes' own inverse, as its .cuda() does (the weights stay as
# the repacking left them: absmax rounded to bf16). Duck-typed: bitsandbytes is imported only
# when a repacked weight is found.
_BNB_CPU_FLAG = "support_avx512bf16_for_cpu"


def hold_bnb_training_layout(layer: nn.Module) -> None:
    """Keep the 4-bit bitsandbytes linears of ``layer`` in their training layout (see above)."""
    held = []
    for m in layer.modules():
        flag = getattr(m, _BNB_CPU_FLAG, False)
        if flag:                     # bitsandbytes' has_avx512bf16(): a truthy int
            setattr(m, _BNB_CPU_FLAG, False)
            held.append((m, flag))
        w = getattr(m, "weight", None)
        if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    if held:
        layer._hycam_bnb_held = held


def release_bnb_training_layout(layer: nn.Module) -> None:
    """Undo :func:`hold_bnb_training_layout` (bitsandbytes may repack again at its next eval
    forward)."""
    for m, flag in layer.__dict__.pop("_hycam_bnb_held", ()):
        setattr(m, _BNB_CPU_FLAG, flag)


def inject(layer: nn.Module, index: int, cfg: HyCAMConfig, shared: SharedState, family: Family,
           tuple_output: bool = False) -> None:
    """Give ``layer`` a HyCAM (on the layer's device, parameters in ``_param_dtype``, computing
    in the activations' dtype) and the patched class running ``family``'s body."""
    device = next(iter(layer.parameters())).device
    orig = type(layer)
    cam = HyCAM(cfg, device=device, dtype=_param_dtype(layer, cfg))
    cam.compute_in_input_dtype = True
    cam.aux_grad_from_model = cfg.aux_loss_coef > 0   # see hycam_ext.load_balancing_loss
    cam.train(layer.training)
    layer.hycam = cam
    layer._hycam_shared = shared
    layer._hycam_layer_index = index
    layer._hycam_positional_names = positional_names(orig)
    if tuple_output:   # older transformers: some layers return (hidden_states,)
        layer._hycam_tuple_output = True
    layer._hycam_family = family
    layer.__class__ = patched_class(orig)
    if "forward" in layer.__dict__:
        # accelerate's hooks (device_map / offload) put a wrapper on the instance that
        # calls ``_old_forward``, bound to the original class's forward: rebind it.
        layer._hycam_saved_old_forward = layer.__dict__["_old_forward"]
        layer._old_forward = types.MethodType(type(layer).forward, layer)
    if cfg.train_layernorms:
        for name in family.norms:
            for p in getattr(layer, name).parameters():
                p.requires_grad_(True)


def eject(layer: nn.Module) -> None:
    """Undo :func:`inject`: the original class, no HyCAM, accelerate's hook rebound."""
    patched = type(layer)
    orig = layer._hycam_original_class
    layer.__class__ = orig
    del layer.hycam
    release_bnb_training_layout(layer)
    if "_hycam_saved_old_forward" in layer.__dict__:
        layer._old_forward = layer.__dict__["_hycam_saved_old_forward"]
    elif getattr(layer.__dict__.get("_old_forward"), "__func__", None) is patched.forward:
        layer._old_forward = types.MethodType(orig.forward, layer)   # hooked after us
    for attr in _LAYER_ATTRS:
        if attr in layer.__dict__:
            delattr(layer, attr)


def prepare(model: nn.Module, cfg: HyCAMConfig,
            who: str = "get_hycam_model") -> Tuple[str, Family, nn.ModuleList, HyCAMConfig]:
    """Every check that needs no forward, before anything changes: the family, its decoder layers
    (not converted already), and the config (``hidden_size`` taken from the model when None,
    refused when it disagrees)."""
    if not isinstance(cfg, HyCAMConfig):
        raise TypeError(f"{who}: cfg must be a hycam_ext.HyCAMConfig, got {type(cfg).__name__}")
    model_type, family = family_of(model, who)
    layers = decoder_layers(model, model_type, family, who)
    d = int(model.config.hidden_size)
    if cfg.hidden_size is None:
        cfg = dataclasses.replace(cfg, hidden_size=d)
    elif cfg.hidden_size != d:
        raise ValueError(f"{who}: HyCAMConfig.hidden_size={cfg.hidden_size} but the model's "
                         f"hidden_size is {d} (leave hidden_size unset to take the model's)")
    return model_type, family, layers, cfg


def convert(model: nn.Module, layers: nn.ModuleList, model_type: str, family: Family,
            cfg: HyCAMConfig, shared: SharedState) -> None:
    """Freeze the base model and put a fresh HyCAM into every decoder layer, checked on a probe
    forward (families.verify_layers); on any failure the model is left as it was."""
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    done = []
    try:
        for layer in layers:
            hold_bnb_training_layout(layer)   # before the probe, which would repack them
        calls = capture_layers(model, layers)
        for p, _ in requires_grad:
            p.requires_grad_(False)
        for i, layer in enumerate(layers):
            out = calls.get(i, (None, None, None))[2]
            inject(layer, i, cfg, shared, family, tuple_output=isinstance(out, tuple))
            done.append(layer)
        shared.probe_task_ids = 0 if cfg.routing == "task" else None
        try:
            verify_layers(model, layers, calls, model_type)
        finally:
            shared.probe_task_ids = None
    except BaseException:
        for layer in done:
            eject(layer)
        for layer in layers:
            release_bnb_training_layout(layer)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
