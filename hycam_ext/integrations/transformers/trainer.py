"""``transformers.Trainer`` support for :class:`HyCAMModel` (imported on first use of
``hycam_ext.integrations.transformers.HyCAMSaveCallback`` / ``HyCAMTrainer``).

* The loss: ``HyCAMModel.forward`` returns ``task loss + aux_loss_coef * L_aux`` in training
  mode and declares ``accepts_loss_kwargs = False``, so the Trainer uses that loss as the
  per-micro-batch mean it is and divides it by the accumulation steps once (the aux term is
  counted once per optimizer step; DDP averages it over ranks like the task loss).
* ``HyCAMSaveCallback``: a plain ``Trainer`` writes its usual checkpoint (the whole wrapper's
  state dict, from which it also resumes); the callback adds the adapter (``save_pretrained``)
  to every ``checkpoint-<step>`` directory.
* ``HyCAMTrainer``: a ``Trainer`` whose own model save writes only the adapter (no base weights),
  and which resumes / loads the best model from such adapter-only checkpoints. Optimizer,
  scheduler, RNG and trainer state are saved and restored by the Trainer as usual.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .adapter_io import ADAPTER_CONFIG_NAME
from .model import HyCAMModel, find_hycam_model

__all__ = ["HyCAMSaveCallback", "HyCAMTrainer", "HyCAMAuxLossCallback", "hycam_shared_states"]

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINING_ARGS_NAME = "training_args.bin"


def hycam_shared_states(model) -> list:
    """The HyCAM states of every converted decoder stack inside ``model`` (whatever wraps it:
    HyCAMModel, a PeftModel, DDP, accelerate)."""
    seen, out = set(), []
    if model is None:
        return out
    for m in model.modules():
        st = getattr(m, "_hycam_shared", None)
        if st is not None and id(st) not in seen:
            seen.add(id(st))
            out.append(st)
    return out


class HyCAMAuxLossCallback(TrainerCallback):
    """For trainers whose loss does not include L_aux (TRL's SFTTrainer, a ``compute_loss_func``):
    scales the aux-loss gradient the model adds by itself by 1 / gradient_accumulation_steps, so
    that L_aux counts once per optimizer step as a per-micro-batch mean, and adds ``aux_loss``
    (mean L_aux of the training forwards since the last log) to the logs and the log history.
    With :class:`HyCAMModel` and the plain Trainer the loss carries L_aux and is divided by the
    Trainer; the callback then only logs."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for st in hycam_shared_states(model):
            st.aux_grad_scale = 1.0 / max(int(args.gradient_accumulation_steps), 1)
            st.log_aux = True
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        vals = [v for v in (st.pop_aux_log() for st in hycam_shared_states(model)) if v is not None]
        if vals and logs is not None and "loss" in logs:
            logs["aux_loss"] = sum(vals) / len(vals)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["aux_loss"] = logs["aux_loss"]
        return control


class HyCAMSaveCallback(TrainerCallback):
    """Write the HyCAM adapter (``HyCAMModel.save_pretrained``) into each checkpoint directory
    ``<output_dir>/checkpoint-<global_step>`` (on the main process), or into ``subdir`` of it.

    Reads the live parameters, so it fits data parallelism (DDP, and FSDP / ZeRO stages that keep
    full parameters between steps); with parameters sharded at rest (FSDP2, ZeRO-3) use
    :class:`HyCAMTrainer`, whose save receives the gathered state dict."""

    def __init__(self, subdir: Optional[str] = None):
        self.subdir = subdir

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        hycam = find_hycam_model(model)
        if hycam is None:
            logger.warning("HyCAMSaveCallback: the Trainer's model is not a HyCAMModel; nothing "
                           "written")
            return control
        ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        hycam.save_pretrained(os.path.join(ckpt, self.subdir) if self.subdir else ckpt)
        return control


class HyCAMTrainer(Trainer):
    """``transformers.Trainer`` with adapter-only model saves for a :class:`HyCAMModel`.

    ``save_model`` / checkpoints write ``hycam_adapter.safetensors`` + ``hycam_adapter_config.json``
    (plus tokenizer and training args) instead of the full state dict, and
    ``train(resume_from_checkpoint=...)`` / ``load_best_model_at_end`` copy the adapter back into
    the model in place. Any other model falls back to the Trainer's own behaviour."""

    def _hycam(self, model=None) -> Optional[HyCAMModel]:
        return find_hycam_model(self.model if model is None else model)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        hycam = self._hycam()
        if hycam is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None and len(state_dict) == 0:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer
            # then writes DeepSpeed's own (sharded) checkpoint; there is no adapter to extract
            logger.warning("HyCAMTrainer: empty state dict (ZeRO-3 without gathering); adapter not "
                           "written to %s", output_dir)
        else:
            logger.info("Saving HyCAM adapter to %s", output_dir)
            hycam.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _adapter_loadable(self, directory: str) -> bool:
        return (os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME))
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        hycam = self._hycam(model)
        if hycam is not None and self._adapter_loadable(resume_from_checkpoint):
            logger.info("Loading HyCAM adapter from %s", resume_from_checkpoint)
            hycam.load_adapter(resume_from_checkpoint)
            return
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        hycam = self._hycam()
        if hycam is not None and best and self._adapter_loadable(best):
            logger.info("Loading best HyCAM adapter from %s (score: %s)", best,
                        self.state.best_metric)
            hycam.load_adapter(best)
            return
        return super()._load_best_model()
