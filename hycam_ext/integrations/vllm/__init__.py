"""Serving HyCAM models with vLLM.

Two halves, each usable without the other's dependencies:

* :func:`export` (``export.py``, needs transformers and safetensors, not vLLM): writes a
  HyCAM-converted Hugging Face model (``get_hycam_model`` or PEFT) as one directory that
  ``vllm.LLM(model=out_dir)`` and ``vllm serve out_dir`` load: base weights and HyCAM weights in
  safetensors, a ``config.json`` whose architecture is ``HyCAM<Base>ForCausalLM`` and which
  carries the HyCAM config under ``hycam_config``, the tokenizer files when there are any.
* :func:`register` (the ``vllm.general_plugins`` entry point, declared in pyproject.toml): tells
  vLLM's ModelRegistry about the HyCAM architectures (``models.py``, imported lazily by vLLM).
  vLLM calls it in every process it starts, so installing hycam_ext next to vLLM is enough.

Task routing (``routing="task"``) is not served yet: a vLLM request has no field that reaches
the model's forward per sequence, so such adapters are refused at export (see ``export.py``).
"""
from __future__ import annotations

from .names import ARCHITECTURES, CONFIG_KEY


def register() -> None:
    """The vLLM plugin: register the HyCAM architectures (by ``module:class`` strings, so vLLM
    imports the model code only when one is served). Safe to call more than once."""
    from vllm import ModelRegistry
    for _, arch in ARCHITECTURES.values():
        ModelRegistry.register_model(arch, f"{__name__}.models:{arch}")


def export(model, out_dir: str, tokenizer=None, **kwargs):
    """See :func:`hycam_ext.integrations.vllm.export.export` (does not import vLLM)."""
    from .export import export as _export
    return _export(model, out_dir, tokenizer=tokenizer, **kwargs)


__all__ = ["register", "export", "ARCHITECTURES", "CONFIG_KEY"]
