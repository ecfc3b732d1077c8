"""Tiny random Hugging Face models and a byte-level tokenizer for the integration tests."""
from __future__ import annotations

import torch

# every model_type of hycam_ext.integrations.transformers.FAMILIES, with what its tiny random
# config needs beyond the common sizes (MoE sizes, a non-trivial residual multiplier, ...)
_EXTRA = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "ministral": dict(head_dim=8, sliding_window=4),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "qwen3": dict(head_dim=8),
    "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    "phi3": dict(original_max_position_embeddings=256),
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0),
    "smollm3": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=4),
    "helium": dict(head_dim=8),
    "glm": dict(head_dim=8),
    "starcoder2": dict(sliding_window=None),
    "cohere": {},
    "cohere2": dict(sliding_window=4),
}
FAMILY_TYPES = tuple(_EXTRA)
ARCHS = ("llama", "qwen2", "mistral")     # the families the longer tests run on


def tiny_config(arch: str, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    import transformers as tf
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch not in _EXTRA:
        raise ValueError(arch)
    return tf.AutoConfig.for_model(arch, **dict(common, **_EXTRA[arch]))


def tiny_model(arch: str, seed: int = 0, **kw):
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    model.config.use_cache = True
    return model.eval()


def byte_tokenizer():
    """A 256-byte BPE (no merges) fast tokenizer with <pad>, <s>, </s>; built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_checkpoint(path, arch: str = "llama", seed: int = 0, **kw) -> str:
    """A tiny random model + byte tokenizer saved as a local HF checkpoint dir; ``kw`` goes to
    :func:`tiny_config` (e.g. ``hidden=64`` for bitsandbytes' CPU path, which needs
    in_features >= 64)."""
    tok = byte_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tok), **kw)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def perturb_hycam(model, seed: int = 1, scale: float = 0.1) -> None:
    """Give every HyCAM non-trivial weights (CAM != 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for cam in model.hycam_modules():
            for name in ("shared_weight", "B", "B_bias", "shared_bias"):
                p = getattr(cam, name)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
