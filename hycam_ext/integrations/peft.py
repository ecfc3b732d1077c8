"""HyCAM as a PEFT method: ``import hycam_ext.integrations.peft`` registers it as "hycam".

    import hycam_ext.integrations.peft
    from hycam_ext.integrations.peft import HyCAMPeftConfig
    model = peft.get_peft_model(base, HyCAMPeftConfig(num_specialists=4, rank=16))

Then PEFT's own surface works: ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors``), ``PeftModel.from_pretrained(base, dir)``,
``AutoPeftModelForCausalLM.from_pretrained(dir)``, ``disable_adapter()``,
``print_trainable_parameters()``, and trainers that take a ``peft_config`` (TRL's SFTTrainer).
Merging raises :class:`HyCAMMergeError`: CAM(x) cannot be folded into the base weights.

The layers are the HF integration's (``hycam_ext.integrations.transformers``: the family table,
the conversion probe, the routing statistics and the aux-loss gradient); this module only adapts
them to PEFT's config / tuner-model interface. One adapter per model.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

try:
    import peft
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType, register_peft_method
except ImportError as e:  # pragma: no cover
    raise ImportError("hycam_ext.integrations.peft needs `peft>=0.21` (pip install \"hycam_ext[hf]\" "
                      "peft)") from e

from packaging.version import Version

from ..config import HyCAMConfig
from .transformers.adapter_io import is_adapter_key
from .transformers.injection import check_transformers_version, convert, eject, prepare
from .transformers.model import HyCAMMergeError, check_task_ids, token_mask_of, with_aux_loss
from .transformers.routing import SharedState

if Version(peft.__version__).release < (0, 21):
    raise ImportError(f"hycam_ext.integrations.peft needs peft>=0.21 (its tuner state-dict hooks), "
                      f"found {peft.__version__}: pip install -U peft")

__all__ = ["HyCAMPeftConfig", "HyCAMPeftModel", "HyCAMMergeError", "PEFT_METHOD"]

PEFT_METHOD = "hycam"


def _peft_type() -> PeftType:
    """``PeftType.HYCAM``. PEFT's ``register_peft_method`` only accepts names that are already
    members of its ``PeftType`` enum, which lists PEFT's own methods; so the member is added here,
    the one place that reaches into the enum's internals (``_member_map_``, ``_value2member_map_``,
    ``_member_names_``: the standard library's Enum bookkeeping, stable across Python 3.10-3.13)."""
    name = PEFT_METHOD.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


_HYCAM_FIELDS = [f.name for f in dataclasses.fields(HyCAMConfig)]


def _config_post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = _peft_type()
    if self.task_type is None:
        self.task_type = "CAUSAL_LM"
    self.hycam_config()   # validates every HyCAM field, naming it


def _hycam_config(self) -> HyCAMConfig:
    """The HyCAMConfig these fields describe."""
    return HyCAMConfig(**{name: getattr(self, name) for name in _HYCAM_FIELDS})


# HyCAMPeftConfig: PeftConfig + HyCAMConfig's fields (generated from HyCAMConfig, so a new
# HyCAM field appears here without a second definition) + what the conversion records of the
# base model, checked when the adapter is loaded.
HyCAMPeftConfig = dataclasses.make_dataclass(
    "HyCAMPeftConfig",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(HyCAMConfig)]
    + [("model_type", Optional[str], dataclasses.field(default=None)),
       ("num_hidden_layers", Optional[int], dataclasses.field(default=None)),
       ("modules_to_save", Optional[list], dataclasses.field(default=None)),
       ("trainable_token_indices", Optional[Any], dataclasses.field(default=None))],
    bases=(PeftConfig,),
    namespace={"__post_init__": _config_post_init, "hycam_config": _hycam_config,
               "__module__": __name__,
               "__doc__": "A PEFT config for HyCAM: PeftConfig's fields, HyCAMConfig's fields "
                          "(hidden_size None: the model's), and model_type / num_hidden_layers "
                          "recorded at conversion."},
)


class _HyCAMStatus(nn.Module, BaseTunerLayer):
    """What PEFT's status functions (``get_layer_status``, used by ``disable_adapter``) look for:
    a tuner layer. It holds no parameters; it reports the adapter's on/off state."""

    adapter_layer_names = ()

    def __init__(self, shared: SharedState, adapter_name: str):
        super().__init__()
        self._hycam_state = shared
        self._active_adapter = adapter_name
        self.merged_adapters = []

    @property
    def disable_adapters(self) -> bool:
        return not self._hycam_state.enabled

    def _get_available_adapters(self) -> set:
        return {self._active_adapter}


class HyCAMPeftModel(BaseTuner):
    """PEFT's tuner model for HyCAM: puts the HF integration's HyCAM layers into the model."""

    prefix = "hycam"
    tuner_layer_cls = nn.Module          # HyCAM is not a wrapper around a targeted module
    target_module_mapping: Dict[str, list] = {}
    uses_shared_state = True

    # ---- injection (replaces PEFT's per-target-module injection) ---------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        check_transformers_version()
        if getattr(self, "_hycam_shared", None) is not None:
            raise ValueError("HyCAM (PEFT): a model holds one HyCAM adapter; unload it first")
        pc = self.peft_config[adapter_name]
        for name in ("modules_to_save", "trainable_token_indices"):
            if getattr(pc, name) is not None:
                raise ValueError(f"HyCAMPeftConfig.{name} is not supported (HyCAM trains only its "
                                 f"own parameters{' and, optionally, the layer norms' if name == 'modules_to_save' else ''})")
        if pc.model_type is not None and pc.model_type != getattr(model.config, "model_type", None):
            raise ValueError(f"HyCAM adapter was trained on a {pc.model_type!r} model; this base "
                             f"model is {getattr(model.config, 'model_type', None)!r}")
        if pc.num_hidden_layers is not None and pc.num_hidden_layers != getattr(
                model.config, "num_hidden_layers", pc.num_hidden_layers):
            raise ValueError(f"HyCAM adapter was trained for num_hidden_layers={pc.num_hidden_layers}, "
                             f"this base model has {model.config.num_hidden_layers}")
        model_type, family, layers, cfg = prepare(model, pc.hycam_config(), who="get_peft_model")
        shared = SharedState(len(layers), cfg.aux_loss_coef, cfg.aux_loss_scope)
        convert(model, layers, model_type, family, cfg, shared)
        self._hycam_shared = shared
        self._hycam_hooks = shared.attach(model.model, token_mask_of)
        self._hycam_cfg = cfg
        self.hycam_status = _HyCAMStatus(shared, adapter_name)
        pc.hidden_size, pc.model_type, pc.num_hidden_layers = cfg.hidden_size, model_type, len(layers)
        self.targeted_module_names = [f"model.layers.{i}" for i in range(len(layers))]

    def _create_and_replace(self, *args, **kwargs):   # PEFT's per-module hook: unused
        raise NotImplementedError("HyCAM injects whole decoder layers (inject_adapter)")

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return False

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        pass   # convert() froze the base model; HyCAM (and the norms, if asked) train

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        pass   # HyCAMConfig.param_dtype decides (float32 master weights by default)

    # ---- forward: the aux loss, as HyCAMModel reports it ------------------------------------
    def forward(self, *args, task_ids=None, **kwargs):
        task_ids = kwargs.pop(_TASK_KWARG, task_ids)
        if self._hycam_shared.enabled:
            check_task_ids(self._hycam_cfg, task_ids)
        labels, total = kwargs.get("labels"), kwargs.get("num_items_in_batch")
        with self._hycam_shared.using_task_ids(task_ids):
            out = self.model(*args, **kwargs)
        weight = 1.0
        if isinstance(labels, torch.Tensor) and total is not None:
            # transformers.Trainer passes num_items_in_batch (the label tokens of the whole
            # accumulated batch) to a PEFT model's base and does not divide the loss by the
            # accumulation steps: weight this micro-batch's L_aux by its share of those tokens
            weight = (labels[..., 1:] != -100).sum() / torch.as_tensor(total).clamp_min(1)
        return with_aux_loss(out, self._hycam_shared, has_labels=labels is not None,
                             weight=weight)

    def generate(self, *args, task_ids=None, **kwargs):
        if self._hycam_shared.enabled:
            check_task_ids(self._hycam_cfg, task_ids)
        with self._hycam_shared.using_task_ids(task_ids):
            return self.model.generate(*args, **kwargs)

    # ---- adapter on / off, merge, unload -------------------------------------------------------
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._hycam_shared.enabled = enabled

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        if adapter_name not in (self.active_adapter, [self.active_adapter]):
            raise ValueError(f"HyCAM (PEFT): no adapter {adapter_name!r}; a model holds one")
        if inference_mode:
            for n, p in self.model.named_parameters():
                if ".hycam." in n:
                    p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("HyCAM (PEFT): a model holds one adapter; use unload() to remove it")

    def _check_merge_allowed(self):
        raise HyCAMMergeError(_MERGE_MESSAGE)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise HyCAMMergeError(_MERGE_MESSAGE)

    def merge_and_unload(self, *args, **kwargs):
        raise HyCAMMergeError(_MERGE_MESSAGE)

    def unload(self) -> nn.Module:
        """Remove HyCAM (modules, patched layer code, hooks); the base model as it was."""
        for layer in self.model.model.layers:
            if getattr(layer, "_hycam_shared", None) is not None:
                eject(layer)
        for h in self._hycam_hooks:
            h.remove()
        self._hycam_hooks, self._hycam_shared = [], None
        return self.model

    # ---- adapter state dict: the HyCAM tensors under their model names ---------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names):
        return {k: v for k, v in state_dict.items() if is_adapter_key(k, config.train_layernorms)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key   # HyCAM's parameter names carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        return dict(state_dict)


_MERGE_MESSAGE = ("HyCAM cannot be merged into the base weights: CAM(x) is an input-dependent, "
                  "routed multiplicative gate, so no fixed change to a linear weight reproduces "
                  "it (unlike LoRA). Keep the adapter, or unload() to get the base model back.")


_TASK_KWARG = "hycam_task_ids"


def _pass_task_ids_through_peft() -> None:
    """``PeftModelForCausalLM.forward`` has a ``task_ids`` parameter of its own (for its Poly
    method) and hands it to the tuner only for Poly. For a HyCAM adapter this wrapper hands it
    on as ``hycam_task_ids``; for every other method the call is unchanged. (``generate`` passes
    its keyword arguments through, so it needs nothing.)"""
    cls = peft.PeftModelForCausalLM
    orig = cls.forward
    if getattr(orig, "_hycam_wrapped", False):
        return

    @functools.wraps(orig)
    def forward(self, *args, task_ids=None, **kwargs):
        if task_ids is not None and self.active_peft_config.peft_type == _peft_type():
            kwargs[_TASK_KWARG], task_ids = task_ids, None
        return orig(self, *args, task_ids=task_ids, **kwargs)

    forward._hycam_wrapped = True
    cls.forward = forward


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    if _peft_type() in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=PEFT_METHOD, config_cls=HyCAMPeftConfig, model_cls=HyCAMPeftModel,
                         prefix="hycam")


_register()
_pass_task_ids_through_peft()
