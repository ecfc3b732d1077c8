"""Adapter files: ``hycam_adapter.safetensors`` (the HyCAM tensors under their base-model names)
and ``hycam_adapter_config.json`` (HyCAMConfig, architecture, shapes, format version).

The functions take the HyCAMModel as ``model`` and use only its public surface
(``base_model``, ``hycam_config``, ``adapter_state_dict``) plus the architecture name."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...config import HyCAMConfig

ADAPTER_WEIGHTS_NAME = "hycam_adapter.safetensors"
ADAPTER_CONFIG_NAME = "hycam_adapter_config.json"
FORMAT_VERSION = 1

_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def is_adapter_key(name: str, train_layernorms: bool) -> bool:
    """Whether a parameter name (with any prefix) is part of the adapter: a HyCAM tensor, or a
    decoder layer norm when the norms are trained."""
    parts = name.split(".")
    layer_norm = (train_layernorms and len(parts) >= 2 and parts[-2] in _LAYER_NORMS
                  and ".layers." in f".{name}")
    return ".hycam." in f".{name}" or layer_norm


def adapter_state_dict(base_model: nn.Module, cfg: HyCAMConfig) -> Dict[str, torch.Tensor]:
    """HyCAM parameters (and the decoder layer norms when cfg.train_layernorms), by the base
    model's parameter names."""
    return {name: p for name, p in base_model.named_parameters(remove_duplicate=False)
            if is_adapter_key(name, cfg.train_layernorms)}


def _pick(own: Dict[str, torch.Tensor], state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The adapter tensors of a full state dict whose keys may carry a wrapper's prefix."""
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
    return picked


def save_adapter(model, model_type: str, save_directory: str,
                 state_dict: Optional[Dict[str, Any]] = None) -> None:
    """Write the two adapter files of ``model`` (see HyCAMModel.save_pretrained)."""
    from safetensors.torch import save_file
    own = model.adapter_state_dict()
    if state_dict is not None:
        own = _pick(own, state_dict)
    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in own.items()}
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME),
              metadata={"format": "pt", "hycam_format_version": str(FORMAT_VERSION)})
    cfg = model.base_model.config
    from ... import __version__
    meta = {
        "format_version": FORMAT_VERSION,
        "adapter_type": "hycam",
        "hycam_ext_version": __version__,
        "hycam_config": model.hycam_config.to_dict(),
        "architecture": type(model.base_model).__name__,
        "model_type": model_type,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": len(model.base_model.model.layers),
        "weights": ADAPTER_WEIGHTS_NAME,
    }
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_adapter_config(adapter_dir: str) -> Dict[str, Any]:
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"HyCAMModel.from_pretrained: no {ADAPTER_CONFIG_NAME} in "
                                f"{adapter_dir!r}")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("adapter_type") != "hycam":
        raise ValueError(f"{cfg_path} is not a HyCAM adapter config")
    return meta


def check_base(meta: Dict[str, Any], base_model: nn.Module, adapter_dir: str) -> None:
    """The adapter's recorded model_type and sizes against a base model (before any conversion)."""
    mcfg = base_model.config
    saved, mt = meta.get("model_type"), getattr(mcfg, "model_type", None)
    if saved is not None and saved != mt:
        raise ValueError(f"HyCAM adapter in {adapter_dir!r} was trained on a {saved!r} model; "
                         f"this base model is {mt!r}")
    for key in ("hidden_size", "num_hidden_layers"):
        want, have = meta.get(key), getattr(mcfg, key, None)
        if want is not None and have is not None and int(want) != int(have):
            raise ValueError(f"HyCAM adapter in {adapter_dir!r} was trained for {key}={want}, "
                             f"this base model has {have}")


def _check_compatible(model, meta: Dict[str, Any], adapter_dir: str) -> None:
    check_base(meta, model.base_model, adapter_dir)
    layers = len(model.base_model.model.layers)
    if int(meta["num_hidden_layers"]) != layers:
        raise ValueError(f"HyCAM adapter has {meta['num_hidden_layers']} layers, the base "
                         f"model {layers}")
    saved_cfg = HyCAMConfig.from_dict(meta["hycam_config"])
    for f in ("num_specialists", "rank", "bias", "train_layernorms"):
        if getattr(saved_cfg, f) != getattr(model.hycam_config, f):
            raise ValueError(f"HyCAM adapter in {adapter_dir!r} has {f}="
                             f"{getattr(saved_cfg, f)!r}, this model "
                             f"{getattr(model.hycam_config, f)!r}")


def load_adapter(model, adapter_dir: str) -> None:
    """Copy a saved adapter's tensors into ``model``'s parameters, in place."""
    from safetensors.torch import load_file
    meta = read_adapter_config(adapter_dir)
    _check_compatible(model, meta, adapter_dir)
    sd = load_file(os.path.join(adapter_dir, meta.get("weights", ADAPTER_WEIGHTS_NAME)))
    own = model.adapter_state_dict()
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
