"""Hugging Face ``transformers`` integration: one HyCAM per decoder layer of a causal LM of a
supported family (``FAMILIES``: Llama, Mistral, Qwen 2/3 and their MoE variants, Gemma 1/2/3,
Phi-3, Granite, OLMo 2/3, SmolLM3, Cohere, ...), without forking the model files and without
renaming any base weight.

    from hycam_ext.integrations.transformers import get_hycam_model
    model = get_hycam_model(AutoModelForCausalLM.from_pretrained(...), HyCAMConfig(...))

The pieces, as PEFT separates them:

* ``families.py``   one entry per model_type: how its layer body runs, and the conversion probe;
* ``layer.py``      the patched decoder layer: the family's body with the HyCAM placement
                    between attention and MLP (``residual``: h = (h_in + a) * CAM(x);
                    ``attention``: h = h_in + a * CAM(x));
* ``injection.py``  putting HyCAM into a layer and taking it out again (``unload()`` restores
                    the original classes);
* ``routing.py``    a forward's routing statistics and how L_aux gets its gradient, also under
                    gradient checkpointing (design note there);
* ``model.py``      ``HyCAMModel`` (the wrapper) and ``get_hycam_model``;
* ``adapter_io.py`` the adapter files (``save_pretrained`` / ``from_pretrained``);
* ``trainer.py``    ``transformers.Trainer`` support (imported on first use).
"""
from .adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .families import FAMILIES, UnsupportedArchitectureError, supported_model_types
from .model import HyCAMMergeError, HyCAMModel, find_hycam_model, get_hycam_model

__all__ = ["get_hycam_model", "HyCAMModel", "UnsupportedArchitectureError", "HyCAMMergeError",
           "FAMILIES", "supported_model_types", "ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME",
           "HyCAMSaveCallback", "HyCAMTrainer", "HyCAMAuxLossCallback", "find_hycam_model"]


def __getattr__(name: str):
    # the Trainer pieces import transformers.Trainer (and accelerate): only on first use
    if name in ("HyCAMSaveCallback", "HyCAMTrainer", "HyCAMAuxLossCallback"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
