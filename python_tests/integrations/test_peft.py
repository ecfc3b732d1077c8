"""HyCAM as a PEFT method ("hycam"), and TRL's SFTTrainer with its default loss."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hycam_ext  # noqa: E402
from hycam_ext.integrations.peft import HyCAMMergeError, HyCAMPeftConfig  # noqa: E402
from hycam_ext.integrations.transformers import HyCAMModel, get_hycam_model  # noqa: E402

from python_tests.hf_tiny import byte_tokenizer, save_tiny_checkpoint, tiny_model  # noqa: E402


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _perturb(model, scale=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_registered_as_a_peft_method():
    assert peft.PeftType.HYCAM == "HYCAM"
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.HYCAM] is HyCAMPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.HYCAM].__name__ == "HyCAMPeftModel"
    cfg = HyCAMPeftConfig(num_specialists=2, rank=8)
    assert cfg.peft_type == peft.PeftType.HYCAM and cfg.task_type == "CAUSAL_LM"
    assert cfg.hycam_config().rank == 8
    with pytest.raises(ValueError, match="HyCAMConfig.rank"):
        HyCAMPeftConfig(rank=0)


def test_peft_round_trip(tmp_path, capsys):
    base_dir = save_tiny_checkpoint(tmp_path / "base", "qwen3")
    import transformers as tf
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = peft.get_peft_model(base, HyCAMPeftConfig(num_specialists=3, rank=4, aux_loss_coef=0.1))
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".hycam." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    _perturb(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(out, ref)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, out)
    # training forward: the loss carries L_aux, the router gets its gradient
    model.train()
    o = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert o.aux_loss is not None
    o.loss.backward()
    router = model.base_model.model.model.layers[0].hycam.router_weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.eval()
    # PEFT's files, and the model_type / sizes recorded for the load-time check
    adir = tmp_path / "adapter"
    model.save_pretrained(str(adir))
    assert sorted(os.listdir(adir)) == ["README.md", "adapter_config.json",
                                        "adapter_model.safetensors"]
    meta = json.loads((adir / "adapter_config.json").read_text())
    assert meta["peft_type"] == "HYCAM" and meta["model_type"] == "qwen3"
    assert meta["hidden_size"] == 32 and meta["num_hidden_layers"] == 2
    from safetensors.torch import load_file
    keys = set(load_file(str(adir / "adapter_model.safetensors")))
    assert keys and all(".hycam." in k for k in keys)
    # PeftModel.from_pretrained and AutoPeftModelForCausalLM give the same outputs
    loaded = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir),
                                            str(adir))
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(adir))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, out)
        assert torch.equal(auto(input_ids=ids, attention_mask=mask).logits, out)
    with pytest.raises(HyCAMMergeError, match="cannot be merged"):
        model.merge_and_unload()
    back = model.unload()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, ref)


def test_peft_checks_its_base_and_the_other_entry_point(tmp_path):
    model = peft.get_peft_model(tiny_model("llama"), HyCAMPeftConfig(num_specialists=2, rank=4))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="'llama'.*'qwen2'"):
        peft.PeftModel.from_pretrained(tiny_model("qwen2"), str(tmp_path))
    # converting an already converted model says so, whichever entry point was used
    with pytest.raises(ValueError, match="already has HyCAM layers"):
        get_hycam_model(model.get_base_model(), hycam_ext.HyCAMConfig())
    hy = get_hycam_model(tiny_model("llama"), hycam_ext.HyCAMConfig(num_specialists=2, rank=4))
    with pytest.raises(ValueError, match="already has HyCAM layers"):
        peft.get_peft_model(hy.base_model, HyCAMPeftConfig())
    with pytest.raises(ValueError, match="hidden_size=64 but the model's hidden_size is 32"):
        peft.get_peft_model(tiny_model("llama"), HyCAMPeftConfig(hidden_size=64))


def test_same_layers_behind_both_entry_points():
    ids, mask, labels = _batch()
    a = get_hycam_model(tiny_model("mistral"), hycam_ext.HyCAMConfig(num_specialists=2, rank=4))
    b = peft.get_peft_model(tiny_model("mistral"), HyCAMPeftConfig(num_specialists=2, rank=4))
    assert isinstance(a, HyCAMModel)
    assert type(a.base_model.model.layers[0]) is type(b.base_model.model.model.layers[0])
    _perturb(a)
    sd = {k: v for k, v in a.base_model.state_dict().items() if ".hycam." in k}
    b.base_model.model.load_state_dict(sd, strict=False)
    a.train()
    b.train()
    torch.manual_seed(3)
    la = a(input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(3)
    lb = b(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(la.loss, lb.loss) and torch.equal(la.aux_loss, lb.aux_loss)


def _sft_trainer(tmp_path, coef, callbacks=None, max_steps=2):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tok = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    torch.manual_seed(0)      # HyCAM's initialisation (get_peft_model runs before the Trainer seeds)
    ds = datasets.Dataset.from_dict({"text": [f"task {i}: {i * 7 % 10}" for i in range(8)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / f"sft-{coef}"), max_steps=max_steps,
                         per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         learning_rate=1e-2, seed=0, disable_tqdm=True)
    return trl.SFTTrainer(model=base, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=HyCAMPeftConfig(num_specialists=3, rank=4,
                                                      aux_loss_coef=coef),
                          callbacks=callbacks)


def _router_grads(trainer, batch):
    """TRL's own compute_loss (its default loss: the fused LM head, not the model's loss) on one
    batch, differentiated; the routers' gradients."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    trainer.compute_loss(model, dict(batch)).backward()
    layers = model.base_model.model.model.layers
    return torch.stack([layer.hycam.router_weight.grad.clone() for layer in layers])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trl_sft_default_loss_carries_the_aux_loss(tmp_path):
    from hycam_ext.routing_stats import aux_loss, total
    coef = 0.5
    trainer = _sft_trainer(tmp_path, coef)
    batch = next(iter(trainer.get_train_dataloader()))
    with_aux = _router_grads(trainer, batch)
    shared = trainer.model.base_model._hycam_shared
    shared.aux_loss_coef = 0.0
    without = _router_grads(trainer, batch)
    assert not torch.allclose(with_aux, without)
    # the difference is exactly coef * dL_aux / dW_router of the same forward
    model = trainer.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    model(**{k: v for k, v in batch.items() if k != "labels"})
    layers = model.base_model.model.model.layers
    aux_loss(total([layer.hycam.last_stats.sums() for layer in layers])).backward()
    want = torch.stack([layer.hycam.router_weight.grad for layer in layers])
    torch.testing.assert_close(with_aux - without, coef * want, atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trl_sft_trains_and_logs_the_aux_loss(tmp_path):
    from hycam_ext.integrations.transformers import HyCAMAuxLossCallback
    trainer = _sft_trainer(tmp_path, 0.1, callbacks=[HyCAMAuxLossCallback()])
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(steps) == 2 and all(0.0 < h["aux_loss"] <= 1.0 for h in steps)
