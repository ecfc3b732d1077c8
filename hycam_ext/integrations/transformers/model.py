"""HyCAMModel: the wrapper a user holds (forward with the aux loss, generate, adapter on/off,
unload, gradient checkpointing, routing statistics, save / load), and get_hycam_model."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...config import HyCAMConfig
from ...modules import HyCAM
from . import adapter_io
from .injection import check_transformers_version, convert, eject, prepare
from .routing import RouteTally, SharedState, step_aux_loss


class HyCAMMergeError(NotImplementedError):
    """HyCAM cannot be merged into the base weights."""


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


def token_mask_of(args, kwargs) -> Optional[torch.Tensor]:
    """[batch, seq] mask of the tokens of this forward (the last seq columns of a 2-D
    attention_mask, which covers the cached tokens too), or None."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else emb
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and ref is not None and ref.dim() >= 2:
        bsz, seq = ref.shape[0], ref.shape[1]
        if mask.shape[0] == bsz and mask.shape[1] >= seq:
            return mask[:, mask.shape[1] - seq:]
    return None


def check_task_ids(cfg: HyCAMConfig, task_ids) -> None:
    """``task_ids`` against ``cfg.routing`` (before any work): required and in range with task
    routing, refused without it."""
    if cfg.routing != "task":
        if task_ids is not None:
            raise ValueError("task_ids given but the adapter routes per token (routing='token'); "
                             "use HyCAMConfig(routing='task', num_tasks=N)")
        return
    if task_ids is None:
        raise ValueError(f"this HyCAM adapter routes by task (routing='task', num_tasks="
                         f"{cfg.num_tasks}): pass task_ids, a [batch] LongTensor of task ids")
    if not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point() \
            or task_ids.dtype == torch.bool or task_ids.dim() != 1:
        raise TypeError(f"task_ids must be a 1-D integer tensor [batch], got "
                        f"{tuple(task_ids.shape) if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__}")
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= cfg.num_tasks):
        raise ValueError(f"task_ids must be in [0, {cfg.num_tasks}) (num_tasks), got "
                         f"[{int(task_ids.min())}, {int(task_ids.max())}]")


def with_aux_loss(out, shared: SharedState, has_labels: bool, weight=1.0):
    """A training forward's output with ``aux_loss`` (L_aux) and, when it has a loss, the loss
    ``+ weight * aux_loss_coef * L_aux`` (differentiable: routing.py's design note); other
    outputs as they are."""
    step = shared.step
    if not (shared.enabled and step is not None and step.has_stats()):
        return out
    coef, scope = shared.aux_loss_coef * weight, shared.aux_loss_scope
    if isinstance(out, tuple):   # return_dict=False: (loss, logits, ...) or (logits, ...)
        aux = step_aux_loss(step, out[0], scope)
        if has_labels and out[0].dim() == 0:
            out = (out[0] + coef * aux.to(out[0].dtype),) + out[1:]
        return out
    loss = getattr(out, "loss", None)
    aux = step_aux_loss(step, loss if loss is not None else out.logits, scope)
    fields = dict(out.items())
    if loss is not None:
        fields["loss"] = loss + coef * aux.to(loss.dtype)
    fields["aux_loss"] = aux
    if dataclasses.is_dataclass(out):
        return _output_type_with_aux(type(out))(**fields)
    for k, v in fields.items():
        out[k] = v
    return out


class HyCAMModel(nn.Module):
    """A causal LM with HyCAM in every decoder layer (returned by :func:`get_hycam_model`).

    Calls behave like the base model's (``model(input_ids=..., labels=...)``, ``generate``);
    in training mode the returned ``loss`` includes ``cfg.aux_loss_coef * L_aux`` and the output
    carries ``aux_loss`` (the unscaled L_aux). Attributes not found here come from the base model.
    """

    def __init__(self, model: nn.Module, cfg: HyCAMConfig):
        super().__init__()
        check_transformers_version()
        model_type, family, layers, cfg = prepare(model, cfg)
        self.base_model = model
        self.hycam_config = cfg
        self._arch = model_type
        self._shared = SharedState(len(layers), cfg.aux_loss_coef, cfg.aux_loss_scope)
        self._requires_grad_backup = {n: p.requires_grad for n, p in model.named_parameters()}
        self._enabled_input_grads = False
        self._unloaded = False
        convert(model, layers, model_type, family, cfg, self._shared)
        self._hooks = self._shared.attach(model.model, token_mask_of)

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

    # ---- forward / generate ----------------------------------------------------------------
    # transformers.Trainer reads this: False makes it pass no ``num_items_in_batch`` and divide
    # the returned (per-micro-batch mean) loss by the accumulation steps itself. With True it
    # would expect a loss already normalised over the whole accumulated (and, across devices,
    # gathered) batch and would scale it by neither, so the aux term, a per-micro-batch mean,
    # would be counted grad_accum (x world size) times.
    accepts_loss_kwargs = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                *args, task_ids=None, **kwargs):
        """The base model's forward (same arguments, named so that transformers.Trainer keeps
        the dataset columns); in training mode ``loss`` includes ``aux_loss_coef * L_aux`` and
        the output carries ``aux_loss``. ``task_ids`` ([batch] LongTensor): each sequence's
        task, required with ``routing="task"``."""
        self._check_loaded()
        if self._shared.enabled:
            check_task_ids(self.hycam_config, task_ids)
        with self._shared.using_task_ids(task_ids):
            return self._forward(input_ids, attention_mask, position_ids, past_key_values,
                                 inputs_embeds, labels, use_cache, *args, **kwargs)

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                 labels, use_cache, *args, **kwargs):
        named = (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                 use_cache)
        if args:   # positional arguments past use_cache: keep the base model's order
            out = self.base_model(*named, *args, **kwargs)
        else:   # only what was given: transformers 5.x warns on past_key_values=None (renamed cache)
            given = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                         use_cache=use_cache)
            out = self.base_model(**{k: v for k, v in given.items() if v is not None}, **kwargs)
        return with_aux_loss(out, self._shared, has_labels=labels is not None)

    def generate(self, *args, task_ids=None, **kwargs):
        """The base model's ``generate``; ``task_ids`` as in :meth:`forward` (each sequence keeps
        its task for every generated token)."""
        self._check_loaded()
        if self._shared.enabled:
            check_task_ids(self.hycam_config, task_ids)
        with self._shared.using_task_ids(task_ids):
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
        K = self.hycam_config.num_specialists
        return torch.stack([torch.full((K,), float("nan")) if s is None
                            else (s.g / s.count.clamp_min(1.0)).float().cpu()
                            for s in step.sums])

    @contextlib.contextmanager
    def collect_routing(self):
        """Accumulate the route distribution of every forward inside the block (eval forwards
        use the deterministic eval routes). Yields a dict; after the block, ``result["dist"]``
        is a [num_layers, K] tensor (fraction of non-padding tokens per specialist),
        ``result["q_dist"]`` the mean router probabilities, ``result["tokens"]`` the counted
        tokens per layer and ``result["aux"]`` L_aux per layer over those tokens."""
        tally = RouteTally(self._shared.num_layers)
        prev = self._shared.tally
        self._shared.tally = tally
        result: Dict[str, Any] = {}
        try:
            yield result
        finally:
            self._shared.tally = prev
            result["dist"] = tally.distribution(self.hycam_config.num_specialists)
            result["tokens"] = tally.counts
            result["q_dist"] = tally.q_distribution(self.hycam_config.num_specialists)
            result["aux"] = tally.aux_values()

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
            eject(layer)
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

    # ---- save / load (adapter_io.py) -----------------------------------------------------------
    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """HyCAM parameters (and the layer norms when cfg.train_layernorms), base-model names."""
        return adapter_io.adapter_state_dict(self.base_model, self.hycam_config)

    def save_pretrained(self, save_directory: str, state_dict: Optional[Dict[str, Any]] = None,
                        is_main_process: bool = True, **_ignored) -> None:
        """Write the adapter only: ``hycam_adapter.safetensors`` + ``hycam_adapter_config.json``.

        ``state_dict``: take the tensors from this (full) state dict instead of the live
        parameters, e.g. the one gathered by ``accelerator.get_state_dict`` under FSDP / DeepSpeed
        ZeRO-3; keys may carry this wrapper's ``base_model.`` prefix or not.
        ``is_main_process=False`` writes nothing (the Trainer / accelerate convention)."""
        if is_main_process:
            adapter_io.save_adapter(self, self._arch, save_directory, state_dict)

    def load_adapter(self, adapter_dir: str) -> None:
        """Copy the weights of a saved adapter into this model's HyCAM parameters, in place (the
        optimizer keeps referring to the same tensors; used to resume from a checkpoint)."""
        adapter_io.load_adapter(self, adapter_dir)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str,
                        is_trainable: bool = True) -> "HyCAMModel":
        meta = adapter_io.read_adapter_config(adapter_dir)
        hcfg = HyCAMConfig.from_dict(meta["hycam_config"])
        adapter_io.check_base(meta, base_model, adapter_dir)
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


def get_hycam_model(model: nn.Module, cfg: Optional[HyCAMConfig] = None) -> HyCAMModel:
    """Put a HyCAM (``cfg``; ``hidden_size`` is taken from the model config) in every decoder
    layer of a causal LM of a supported family (``families.FAMILIES``, by ``config.model_type``),
    freeze the base model and return the :class:`HyCAMModel` wrapper. Base weight names are
    unchanged; the HyCAM parameters appear as ``model.layers.<i>.hycam.*``. A fresh conversion
    computes the base model exactly (checked on a probe forward at conversion)."""
    return HyCAMModel(model, cfg if cfg is not None else HyCAMConfig())
