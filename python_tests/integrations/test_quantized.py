"""HyCAM on quantised bases (CPU): bitsandbytes 4-bit nf4 and 8-bit, torchao int8 weight-only.

A tiny random Llama (hidden 64: bitsandbytes' CPU path needs in_features >= 64) is saved once and
loaded quantised with ``from_pretrained(..., quantization_config=..., device_map="cpu")``, as a
user would. Each base: a fresh adapter gives the quantised base's logits exactly, a few steps
lower the loss with the quantised weights untouched, and the adapter round-trips through
save/load bitwise.

bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight into an inference-only layout (no
autograd) at its first eval forward without grad; the converted layers must keep the training
layout (hycam_ext/integrations/transformers/injection.py, hold_bnb_training_layout), so the
reference logits here come from a train-mode forward (no dropout in this config) and the
backward's "autograd kernel was not registered" warning is an error. On other CPUs nothing is
repacked and those checks hold trivially."""
import pytest
import torch
import transformers

import hycam_ext
from hycam_ext.integrations.transformers import HyCAMModel, get_hycam_model
from python_tests.hf_tiny import save_tiny_checkpoint

HIDDEN = 64
NO_AUTOGRAD = "error:.*an autograd kernel was not registered"   # a kernel dropping gradients
pytestmark = pytest.mark.filterwarnings(NO_AUTOGRAD)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama_q"), "llama", seed=0,
                                hidden=HIDDEN)


def _bnb_4bit():
    # the usual QLoRA recipe: nf4 weights, bf16 compute, the rest of the model in bf16
    return dict(quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16)


def _bnb_8bit():
    return dict(quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
                dtype=torch.float32)


def _torchao_int8wo():
    from torchao.quantization import Int8WeightOnlyConfig
    return dict(quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()),
                dtype=torch.float32)


def _load(ckpt, quant):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", **quant())
    return model.eval()


def _cfg(**kw):
    return hycam_ext.HyCAMConfig(**dict(dict(num_specialists=3, rank=4, aux_loss_coef=0.01), **kw))


def _batch(vocab, bsz=2, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0            # left padding in the first row
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _packed_for_cpu(model):
    """Linear4bit modules whose weight bitsandbytes repacked into its CPU inference layout."""
    return [n for n, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False)]


def _base_logits(model, ids, mask, train_mode=False):
    """The base's logits; ``train_mode`` (no dropout here) for a 4-bit base, whose eval forward
    would let bitsandbytes repack its weights (see the module docstring). An 8-bit base's
    forward differs between train and eval mode, so it is taken in eval mode."""
    model.train(train_mode)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    model.eval()
    return out


def _quantised_weights(model):
    """The frozen quantised storage of the first decoder layer (to check it is left alone);
    a tensor subclass (torchao) by its inner tensors."""
    out = {}
    for n, p in model.model.layers[0].self_attn.named_parameters():
        if hasattr(p, "__tensor_flatten__"):
            for inner in p.__tensor_flatten__()[0]:
                out[f"{n}.{inner}"] = getattr(p, inner).detach().clone()
        else:
            out[n] = p.detach().clone()
    return out


def _check_quantised_base(ckpt, tmp_path, quant, expect_linear, act_dtype, steps=8,
                          ref_in_train_mode=False):
    base = _load(ckpt, quant)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert expect_linear in type(q_proj).__name__ + type(q_proj.weight).__name__, (
        type(q_proj), type(q_proj.weight))   # the base really is quantised
    ids, mask, labels = _batch(base.config.vocab_size)
    ref = _base_logits(base, ids, mask, ref_in_train_mode)
    assert ref.dtype == act_dtype

    model = get_hycam_model(base, _cfg())
    assert not _packed_for_cpu(base)      # the conversion probe did not repack them
    cams = model.hycam_modules()
    assert cams and all(p.dtype == torch.float32 for c in cams for p in c.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)

    frozen0 = _quantised_weights(base)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert all(c.shared_weight.grad is not None and c.shared_weight.grad.dtype == torch.float32
                   for c in cams)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, w in _quantised_weights(base).items():
        assert torch.equal(w, frozen0[n]), n

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(trained, ref)
    model.save_pretrained(str(tmp_path))
    loaded = HyCAMModel.from_pretrained(_load(ckpt, quant), str(tmp_path))
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, trained)


def test_bnb_4bit_nf4_base(ckpt, tmp_path):
    _check_quantised_base(ckpt, tmp_path, _bnb_4bit, "Linear4bit", torch.bfloat16,
                          ref_in_train_mode=True)


def test_bnb_8bit_base(ckpt, tmp_path):
    _check_quantised_base(ckpt, tmp_path, _bnb_8bit, "Linear8bitLt", torch.float32)


def test_bnb_4bit_base_dtype_params(ckpt):
    """param_dtype="base" on a 4-bit base: HyCAM in the dtype of the layer's float parameters
    (its bf16 norms; the packed nf4 weights are not floating point), still exact at init."""
    base = _load(ckpt, _bnb_4bit)
    ids, mask, _ = _batch(base.config.vocab_size, seed=3)
    ref = _base_logits(base, ids, mask, train_mode=True)
    model = get_hycam_model(base, _cfg(param_dtype="base"))
    assert all(p.dtype == torch.bfloat16 for c in model.hycam_modules() for p in c.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_bnb_4bit_evaluated_before_conversion_still_trains(ckpt):
    """An eval forward of the base before get_hycam_model (it may repack the 4-bit weights into
    bitsandbytes' CPU inference layout): the conversion restores the training layout, so the
    backward reaches every HyCAM through the 4-bit layers; unload() hands the layout back."""
    import bitsandbytes as bnb
    base = _load(ckpt, _bnb_4bit)
    ids, mask, labels = _batch(base.config.vocab_size, seed=4)
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask)        # eval, no grad
    flags = {n: m.support_avx512bf16_for_cpu for n, m in base.named_modules()
             if isinstance(m, bnb.nn.Linear4bit)}
    model = get_hycam_model(base, _cfg())
    assert not _packed_for_cpu(base)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()   # no warning
    assert all(c.shared_weight.grad.abs().sum() > 0 for c in model.hycam_modules())
    restored = model.unload()
    assert {n: m.support_avx512bf16_for_cpu for n, m in restored.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)} == flags


def test_torchao_int8_weight_only_base(ckpt, tmp_path):
    pytest.importorskip("torchao")
    _check_quantised_base(ckpt, tmp_path, _torchao_int8wo, "Int8", torch.float32)
