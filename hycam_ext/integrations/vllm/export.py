"""Export a HyCAM-converted Hugging Face model as a directory vLLM serves (no vLLM needed here).

    from hycam_ext.integrations.vllm import export
    export(model, "out/served", tokenizer=tok)      # model: get_hycam_model(...) or PEFT
    # then, where vLLM and hycam_ext are installed:  vllm serve out/served

The directory holds ``model.safetensors`` (every base weight under its Hugging Face name and
every HyCAM tensor as ``model.layers.<i>.hycam.*``, each in the dtype it has in the model),
``config.json`` (the base model's config with ``architectures = ["HyCAM<Base>ForCausalLM"]`` and
the HyCAM config under ``hycam_config``), ``generation_config.json`` when the model has one, and
the tokenizer files (from ``tokenizer``, or copied from the model's source directory).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ...config import HyCAMConfig
from .names import ARCHITECTURES, CONFIG_KEY

WEIGHTS_NAME = "model.safetensors"
# what a Hugging Face source directory may hold of its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


class HyCAMExportError(ValueError):
    """The model cannot be exported for vLLM (unsupported family, task routing, ...)."""


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM with HyCAM layers inside ``model``: a HyCAMModel's
    ``base_model``, a PEFT model's ``base_model.model``, or the model itself."""
    from ..transformers.model import find_hycam_model
    hm = find_hycam_model(model)
    if hm is not None:
        return hm.base_model
    cand = model
    for _ in range(3):   # PeftModel -> HyCAMPeftModel (BaseTuner) -> the HF model
        inner = getattr(cand, "model", None) if hasattr(cand, "peft_config") else None
        if inner is None:
            inner = getattr(cand, "base_model", None)
        if inner is None or inner is cand:
            break
        cand = inner
        if _layers(cand) is not None:
            return cand
    if _layers(model) is not None:
        return model
    raise HyCAMExportError(
        f"export: {type(model).__name__} is not a HyCAM model: pass what get_hycam_model(...) or "
        f"peft.get_peft_model(..., HyCAMPeftConfig(...)) returned")


def _layers(m: nn.Module):
    inner = getattr(m, "model", None)
    layers = getattr(inner, "layers", None) if isinstance(inner, nn.Module) else None
    if (isinstance(layers, nn.ModuleList) and len(layers) > 0
            and all(isinstance(getattr(layer, "hycam", None), nn.Module) for layer in layers)):
        return layers
    return None


def _check(hf: nn.Module, cfg: HyCAMConfig) -> Tuple[str, str]:
    mt = getattr(hf.config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise HyCAMExportError(
            f"export: model_type {mt!r} is not served by the HyCAM vLLM plugin yet; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (the Hugging Face integration supports more "
            f"families: serve those with HyCAMModel.generate)")
    if cfg.routing == "task":
        raise HyCAMExportError(
            "export: this adapter routes by task (routing='task'), which vLLM cannot serve yet: "
            "every token's route depends on its sequence's task id, and a vLLM request has no "
            "field that reaches the model's forward per sequence (the batch is flattened into "
            "tokens of many requests). Serve it with HyCAMModel.generate(..., task_ids=...), or "
            "train with routing='token' (the paper's router)")
    if getattr(hf.config, "quantization_config", None) is not None:
        raise HyCAMExportError(
            "export: the base model is quantised (quantization_config); export a 16/32-bit base "
            "(vLLM quantises at load time with its own methods)")
    return ARCHITECTURES[mt]


def _tensors(hf: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict, one entry per storage (tied weights once: vLLM re-ties them)."""
    sd = hf.state_dict()
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    out, seen = {}, {}
    for k, v in sd.items():
        if tied and k == "lm_head.weight":
            continue
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            raise HyCAMExportError(f"export: {k} has no data (meta device); load the model fully")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and v.numel() > 0:
            continue
        seen[key] = k
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def _config(hf: nn.Module, arch: str, cfg: HyCAMConfig) -> Dict[str, Any]:
    from ... import __version__
    d = hf.config.to_dict()
    d["architectures"] = [arch]
    d[CONFIG_KEY] = cfg.to_dict()
    d["hycam_ext_version"] = __version__
    return d


def _tokenizer(hf: nn.Module, tokenizer, out_dir: str) -> Optional[str]:
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        return "tokenizer"
    src = getattr(hf.config, "_name_or_path", None) or getattr(hf, "name_or_path", None)
    if isinstance(src, str) and os.path.isdir(src):
        copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        for f in copied:
            shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))
        if copied:
            return src
    return None


def export(model: nn.Module, out_dir: str, tokenizer=None) -> str:
    """Write ``model`` (a HyCAM-converted causal LM: ``get_hycam_model`` or PEFT with the HyCAM
    method) to ``out_dir`` for vLLM; returns ``out_dir``. ``tokenizer``: saved with it (else the
    tokenizer files of the model's source directory are copied when it has any; without them
    serve with ``skip_tokenizer_init=True`` or ``--tokenizer``).

    Raises HyCAMExportError for families the vLLM plugin does not serve (hycam_ext.integrations.
    vllm.ARCHITECTURES), for ``routing="task"`` adapters and for quantised bases."""
    from safetensors.torch import save_file
    hf = _hf_model(model)
    layers = _layers(hf)
    cfg = layers[0].hycam.cfg
    if not isinstance(cfg, HyCAMConfig):
        raise HyCAMExportError("export: the HyCAM layers carry no HyCAMConfig")
    _, arch = _check(hf, cfg)
    os.makedirs(out_dir, exist_ok=True)
    tensors = _tensors(hf)
    missing = [i for i in range(len(layers)) if f"model.layers.{i}.hycam.shared_weight" not in tensors]
    if missing:
        raise HyCAMExportError(f"export: HyCAM tensors of layers {missing[:5]} are not named "
                               f"model.layers.<i>.hycam.* in the model's state dict")
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_config(hf, arch, cfg), f, indent=2, sort_keys=True)
    gen = getattr(hf, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out_dir)
    _tokenizer(hf, tokenizer, out_dir)
    return out_dir
