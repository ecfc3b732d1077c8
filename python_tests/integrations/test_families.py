"""Every model family of the HF integration on a tiny random config: exact conversion, cached and
uncached generation, save / load, training, gradient checkpointing; the conversion probe; the
adapter checked against its base."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import hycam_ext  # noqa: E402
from hycam_ext.integrations.transformers import (  # noqa: E402
    FAMILIES, HyCAMModel, UnsupportedArchitectureError, get_hycam_model)
from hycam_ext.integrations.transformers import families as fam_mod  # noqa: E402

from python_tests.hf_tiny import FAMILY_TYPES, perturb_hycam, tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def _cfg(**kw):
    return hycam_ext.HyCAMConfig(**dict(dict(num_specialists=3, rank=4, aux_loss_coef=0.1), **kw))


def _batch(bsz=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                      # left padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def test_table_covers_the_tested_families():
    assert set(FAMILY_TYPES) == set(FAMILIES)
    for mt, fam in FAMILIES.items():
        assert fam.formula, mt           # each body documents its formula


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family(model_type, tmp_path):
    base = tiny_model(model_type)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_hycam_model(base, _cfg())
    # 1. a fresh adapter is the base model, bitwise in fp32, with left padding
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    # 2. a non-trivial adapter changes the output; cached and uncached greedy decoding agree
    perturb_hycam(model, scale=0.3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(out, ref)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **gen)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **gen)
    assert torch.equal(cached, uncached)
    # 3. save / load round trip into a fresh base
    model.save_pretrained(str(tmp_path))
    loaded = HyCAMModel.from_pretrained(tiny_model(model_type), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, out)
    # 4. gradient checkpointing gives the same gradients; the router gets the aux gradient
    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_enable(use_reentrant=False)
        else:
            model.gradient_checkpointing_disable()
        model.train()
        torch.manual_seed(7)
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.trainable_parameters()}
    plain, ckpt = grads(False), grads(True)
    model.gradient_checkpointing_disable()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-4)
    assert plain["model.layers.0.hycam.router_weight"].abs().sum() > 0
    # 5. a few steps lower the loss (same batch, eval-mode routing for the measurement)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    before = eval_loss()
    for step in range(6):
        model.train()
        torch.manual_seed(step)
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    assert eval_loss() < before


def test_probe_refuses_a_wrong_body_and_leaves_the_model(monkeypatch):
    base = tiny_model("gemma2")
    ids, mask, _ = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    keys = list(base.state_dict())
    # the Llama body on a sandwich-norm layer: what simply adding Gemma 2 to a table would do
    wrong = dataclasses.replace(FAMILIES["gemma2"], body=fam_mod.pre_norm)
    monkeypatch.setitem(FAMILIES, "gemma2", wrong)
    with pytest.raises(UnsupportedArchitectureError, match="does not reproduce the original"):
        get_hycam_model(base, _cfg())
    assert list(base.state_dict()) == keys
    assert type(base.model.layers[0]).__name__ == "Gemma2DecoderLayer"
    assert all(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).logits, ref)


def test_unknown_model_type_says_how_to_add_one():
    base = tiny_model("llama")
    base.config.model_type = "my_new_llm"
    with pytest.raises(UnsupportedArchitectureError, match="my_new_llm.*families.py"):
        get_hycam_model(base, _cfg())


def test_adapter_checked_against_its_base(tmp_path):
    model = get_hycam_model(tiny_model("llama"), _cfg())
    model.save_pretrained(str(tmp_path))
    # a same-sized Qwen2 is another family: refused, naming both
    with pytest.raises(ValueError, match="'llama'.*'qwen2'"):
        HyCAMModel.from_pretrained(tiny_model("qwen2"), str(tmp_path))
    with pytest.raises(ValueError, match="hidden_size"):
        HyCAMModel.from_pretrained(tiny_model("llama", hidden=64), str(tmp_path))


def test_explicit_hidden_size_must_match():
    with pytest.raises(ValueError, match="hidden_size=48 but the model's hidden_size is 32"):
        get_hycam_model(tiny_model("llama"), _cfg(hidden_size=48))
    model = get_hycam_model(tiny_model("llama"), _cfg(hidden_size=32))
    assert model.hycam_config.hidden_size == 32
    with pytest.raises(ValueError, match="already has HyCAM layers"):
        get_hycam_model(model, _cfg())


@pytest.mark.parametrize("param_dtype", ["float32", "base"])
def test_bf16_base_parameters(param_dtype):
    base = tiny_model("qwen3").to(torch.bfloat16)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_hycam_model(base, _cfg(param_dtype=param_dtype))
    want = torch.float32 if param_dtype == "float32" else torch.bfloat16
    assert all(p.dtype == want for _, p in model.trainable_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == want for _, p in model.trainable_parameters())
