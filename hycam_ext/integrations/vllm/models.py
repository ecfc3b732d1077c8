"""vLLM model classes with HyCAM in every decoder layer (imported by vLLM through the plugin).

Each class is vLLM's own ``<Base>ForCausalLM``; after the base constructor each decoder layer gets
a ``hycam`` submodule and its class is swapped for a subclass whose forward puts the HyCAM
placement between attention and MLP. vLLM's layers hand the residual stream on separately and
fuse the residual add into the next norm (``norm(x, residual) -> (normed, x + residual)``); the
placement needs h' = h_in + a as a value, so the layer computes it explicitly:

    x, h_in = input_layernorm(hidden, residual)     # h_in = hidden + residual (the stream)
    a  = self_attn(x)
    h' = HyCAM.placement_forward(x, h_in, a)         # residual: (h_in + a) * CAM(x)
                                                     # attention: h_in + a * CAM(x)
    return mlp(post_attention_layernorm(h')), h'     # the next norm adds them: h' + mlp(...)

which is the Hugging Face integration's pre-norm body (families.py, ``pre_norm``) term for term.
HyCAM runs through the hycam ops (C++ kernels on CPU, CUDA kernels on a GPU), in eval mode: the
router's hard top-1 is deterministic. The HyCAM weights load by their names
(``model.layers.<i>.hycam.*``) through vLLM's own weight loader.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from ...config import HyCAMConfig
from ...modules import HyCAM
from .names import CONFIG_KEY


def hycam_config_of(hf_config) -> HyCAMConfig:
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        raise ValueError(f"HyCAM vLLM model: config.json has no {CONFIG_KEY!r}; write the "
                         f"directory with hycam_ext.integrations.vllm.export")
    cfg = HyCAMConfig.from_dict(dict(raw))
    if cfg.routing == "task":
        raise ValueError("HyCAM vLLM model: routing='task' adapters cannot be served yet (a "
                         "request cannot pass its task id to the model's forward)")
    if cfg.hidden_size is None:
        cfg.hidden_size = int(hf_config.hidden_size)
    if cfg.hidden_size != int(hf_config.hidden_size):
        raise ValueError(f"HyCAM vLLM model: hycam_config.hidden_size {cfg.hidden_size} != "
                         f"the model's hidden_size {hf_config.hidden_size}")
    return cfg


def hycam_layer_forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                        residual, **kwargs):
    """The pre-norm decoder layer with HyCAM (see the module docstring)."""
    if residual is None:
        h_in = hidden_states
        x = self.input_layernorm(hidden_states)
    else:
        x, h_in = self.input_layernorm(hidden_states, residual)
    if kwargs:   # the base layers take none either
        raise TypeError(f"{type(self).__name__}.forward: unexpected arguments {sorted(kwargs)}")
    a = self.self_attn(positions=positions, hidden_states=x)
    h = self.hycam.placement_forward(x, h_in, a)
    return self.mlp(self.post_attention_layernorm(h)), h


_LAYER_CLASSES: Dict[type, type] = {}


def _hycam_layer_class(orig: type) -> type:
    cls = _LAYER_CLASSES.get(orig)
    if cls is None:
        cls = type(f"HyCAM{orig.__name__}", (orig,),
                   {"forward": hycam_layer_forward, "__module__": __name__})
        _LAYER_CLASSES[orig] = cls
    return cls


def add_hycam(model: nn.Module, hf_config) -> None:
    """Give every decoder layer of ``model.model`` (this pipeline stage's) a HyCAM, created in
    the default dtype and on the default device vLLM builds the model with; the weights come
    later from the checkpoint."""
    cfg = hycam_config_of(hf_config)
    inner = model.model
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(inner.layers))
    for i in range(start, end):
        layer = inner.layers[i]
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                raise TypeError(f"HyCAM vLLM model: decoder layer {i} ({type(layer).__name__}) "
                                f"has no {name}; this vLLM version changed the layer")
        cam = HyCAM(cfg)
        # like the HF integration: compute in the activations' dtype (the weights are cast to
        # the model dtype once at load instead of per forward: the same values)
        cam.compute_in_input_dtype = True
        cam.eval()
        layer.hycam = cam
        layer.__class__ = _hycam_layer_class(type(layer))


def _make(base: type, name: str) -> type:
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        add_hycam(self, vllm_config.model_config.hf_config)

    def train(self, mode: bool = True):
        # serving only: HyCAM's routing must stay the deterministic eval routing
        return base.train(self, False)

    return type(name, (base,), {"__init__": __init__, "train": train, "__module__": __name__,
                                "__doc__": f"vLLM's {base.__name__} with HyCAM in every "
                                           f"decoder layer (hycam_ext)."})


from vllm.model_executor.models.llama import LlamaForCausalLM  # noqa: E402
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM  # noqa: E402

HyCAMLlamaForCausalLM = _make(LlamaForCausalLM, "HyCAMLlamaForCausalLM")
HyCAMQwen2ForCausalLM = _make(Qwen2ForCausalLM, "HyCAMQwen2ForCausalLM")
HyCAMQwen3ForCausalLM = _make(Qwen3ForCausalLM, "HyCAMQwen3ForCausalLM")
