"""vLLM (CPU backend) against HyCAMModel.generate, one tiny random model per family.

Run by test_vllm_serving.py in a subprocess of the vLLM venv (vLLM spawns its engine process, so
this needs the __main__ guard), from a scratch directory so that ``import hycam_ext`` is the
installed one (built against the venv's torch), not the checkout's:

    python serve_check.py OUT.json WORKDIR llama qwen2 qwen3
    python serve_check.py served OUT_DIR PROMPT OUT.json    (an export for the OpenAI server)

For each family: a random base (hidden 128, 2 heads of 64: vLLM's CPU attention takes head_dim
64, not 16), HyCAM with every parameter perturbed (a "trained" adapter: CAM != 1 and the routes
vary by token), exported with hycam_ext.integrations.vllm.export; the HF side greedy-decodes each
prompt with HyCAMModel.generate (output_logits), the vLLM side the whole batch at once. Also a
fresh (identity) adapter against the base model's own tokens. Writes tokens and log-probs.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

PROMPTS = [[5, 17, 42], [9, 3, 250, 77, 31, 8, 120], [44] * 2 + list(range(60, 70)),
           [200, 199, 7, 7, 101]]
MAX_NEW = 8
VOCAB = 256


def tiny_config(family: str, vocab: int = VOCAB):
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if family == "llama":   # untied head
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":   # q/k/v biases, tied head
        return tf.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":   # q/k norms, explicit head_dim, tied head
        return tf.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True,
                              use_sliding_window=False)
    raise ValueError(family)


def build(family: str, trained: bool, seed: int, vocab: int = VOCAB, placement: str = "residual"):
    import torch
    import transformers as tf
    from hycam_ext import HyCAMConfig
    from hycam_ext.integrations.transformers import get_hycam_model
    torch.manual_seed(seed)
    base = tf.AutoModelForCausalLM.from_config(tiny_config(family, vocab)).float()
    with torch.no_grad():   # non-zero biases too (qwen2's q/k/v), so that their loading counts
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
    model = get_hycam_model(base, HyCAMConfig(num_specialists=4, rank=8, alpha=16.0,
                                              placement=placement))
    if trained:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".hycam." in n:
                    p.add_(torch.randn_like(p) * (0.3 if n.endswith(("router_weight", "router_bias")) else 0.05))
    return model.eval()


def hf_generate(model, base_only: bool):
    import contextlib
    import torch
    res = []
    ctx = model.disable_adapter() if base_only else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            toks = out.sequences[0, len(p):].tolist()
            lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, toks)]
            res.append({"tokens": toks, "logprobs": lps})
    return res


def vllm_generate(path: str):
    from vllm import LLM, SamplingParams
    llm = LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=64,
              skip_tokenizer_init=True, seed=0)
    arch = llm.llm_engine.model_config.architectures
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        toks = list(c.token_ids)
        res.append({"tokens": toks, "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, toks)]})
    del llm
    gc.collect()
    return res, arch


def byte_tokenizer():
    """A 256-byte BPE fast tokenizer with <pad>, <s>, </s> (python_tests/hf_tiny.py's, which this
    script cannot import: it runs outside the checkout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):   # (a set: its order varies by process)
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def export_with_tokenizer(out_dir: str, prompt: str, out_json: str):
    """``served`` mode: a tiny Llama with a perturbed adapter in the ``attention`` placement
    (h' = h_in + a * CAM(x); the family runs above use the default ``residual``) and the byte
    tokenizer, exported for the OpenAI server; writes HyCAMModel.generate's greedy tokens for
    ``prompt``."""
    import torch
    from hycam_ext.integrations.vllm import export
    tok = byte_tokenizer()
    model = build("llama", trained=True, seed=7, vocab=len(tok), placement="attention")
    export(model, out_dir, tokenizer=tok)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
              do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(**kw)
        with model.disable_adapter():
            base = model.generate(**kw)
    n = ids.shape[1]
    with open(out_json, "w") as f:
        json.dump({"prompt_ids": ids[0].tolist(), "tokens": out[0, n:].tolist(),
                   "base_tokens": base[0, n:].tolist()}, f)


def main():
    if sys.argv[1] == "served":
        return export_with_tokenizer(sys.argv[2], sys.argv[3], sys.argv[4])
    out_json, work = sys.argv[1], sys.argv[2]
    families = sys.argv[3:]
    from hycam_ext.integrations.vllm import export
    results = {}
    for i, fam in enumerate(families):
        t0 = time.time()
        r = {}
        trained = build(fam, trained=True, seed=100 + i)
        r["hf_trained"] = hf_generate(trained, base_only=False)
        r["hf_base"] = hf_generate(trained, base_only=True)
        d = export(trained, os.path.join(work, f"{fam}_trained"))
        r["vllm_trained"], r["arch"] = vllm_generate(d)
        fresh = build(fam, trained=False, seed=100 + i)     # the same base weights
        r["hf_fresh_base"] = hf_generate(fresh, base_only=True)
        d = export(fresh, os.path.join(work, f"{fam}_fresh"))
        r["vllm_fresh"], _ = vllm_generate(d)
        r["seconds"] = time.time() - t0
        results[fam] = r
        print(f"serve_check: {fam} done in {r['seconds']:.1f}s", flush=True)
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
