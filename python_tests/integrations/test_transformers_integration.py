"""HyCAM in Hugging Face causal LMs (hycam_ext.integrations.transformers)."""
import inspect
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import hycam_ext  # noqa: E402
from hycam_ext.integrations.transformers import (  # noqa: E402
    ADAPTER_CONFIG_NAME, HyCAMMergeError, HyCAMModel, UnsupportedArchitectureError,
    get_hycam_model)

from hycam_ext.routing_stats import aux_loss, total  # noqa: E402
from python_tests.hf_tiny import ARCHS, perturb_hycam, tiny_model  # noqa: E402
from python_tests.helpers import ROOT, worker_env  # noqa: E402

# a FutureWarning from transformers here is one every user of the wrapper would see
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def _cfg(**kw):
    base = dict(num_specialists=3, rank=4, aux_loss_coef=0.1)
    base.update(kw)
    return hycam_ext.HyCAMConfig(**base)


def _batch(vocab=128, bsz=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0            # left padding in the first row
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_identity_names_and_trainables(arch):
    base = tiny_model(arch)
    ids, mask, _ = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    names_before = list(base.state_dict().keys())
    model = get_hycam_model(base, _cfg())
    assert isinstance(model, HyCAMModel)
    assert model.hycam_config.hidden_size == base.config.hidden_size
    # base weight names unchanged, HyCAM params added under model.layers.<i>.hycam
    sd_keys = list(base.state_dict().keys())
    assert [k for k in sd_keys if ".hycam." not in k] == names_before
    trainable = [n for n, _ in model.trainable_parameters()]
    assert trainable and all(".hycam." in n for n in trainable)
    assert len([n for n in trainable if n.endswith("router_weight")]) == 2
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)          # CAM == 1 exactly at init


def test_identity_attention_placement_and_print(capsys):
    base = tiny_model("llama")
    ids, mask, _ = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_hycam_model(base, _cfg(placement="attention"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_with_kv_cache(arch):
    base = tiny_model(arch)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    ref = base.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = get_hycam_model(base, _cfg())
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       ref)
    perturb_hycam(model, scale=0.3)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                            pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False,
                              pad_token_id=0)
    assert torch.equal(cached, uncached)
    # incremental decoding with a cache gives the full-sequence logits
    with torch.no_grad():
        full = model(input_ids=cached).logits
        out = model(input_ids=cached[:, :-2], use_cache=True)
        # transformers 5.x renamed the argument to `cache` (past_key_values warns there)
        name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        step = model(input_ids=cached[:, -2:], use_cache=True, **{name: out.past_key_values}).logits
    torch.testing.assert_close(step, full[:, -2:], atol=1e-5, rtol=1e-4)


def test_training_lowers_loss_and_moves_router():
    base = tiny_model("mistral")
    model = get_hycam_model(base, _cfg(aux_loss_coef=0.01))
    ids, mask, labels = _batch(bsz=4, seq=12, seed=5)
    router0 = [c.router_weight.detach().clone() for c in model.hycam_modules()]
    frozen0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(12):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.aux_loss is not None and out.aux_loss.item() > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for r0, c in zip(router0, model.hycam_modules()):
        assert not torch.equal(r0, c.router_weight)
    assert torch.equal(frozen0, base.model.layers[0].self_attn.q_proj.weight)
    stats = model.routing_stats()
    assert stats.shape == (2, 3)
    torch.testing.assert_close(stats.sum(-1), torch.ones(2))


def test_aux_loss_matches_load_balancing_loss_and_skips_padding():
    base = tiny_model("llama")
    coef = 0.5
    model = get_hycam_model(base, _cfg(aux_loss_coef=coef))
    perturb_hycam(model)
    ids, mask, labels = _batch()
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    lb = hycam_ext.load_balancing_loss(model)
    torch.testing.assert_close(out.aux_loss, lb)
    # the recorded token masks leave the padding out
    for cam in model.hycam_modules():
        assert cam.last_token_mask is not None
        assert int(cam.last_token_mask.sum()) == int(mask.sum())
    # loss = task loss + coef * aux
    torch.manual_seed(0)
    task = model.base_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.loss, task + coef * lb)


def _grads(model, mode, ids, mask, labels, autocast=False):
    model.zero_grad(set_to_none=True)
    if mode == "plain":
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(use_reentrant=(mode == "reentrant"))
    model.train()
    torch.manual_seed(1234)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.trainable_parameters()}


@pytest.mark.parametrize("fresh,use_kernels", [(True, True), (False, True), (False, False)])
def test_gradient_checkpointing_parity_and_router_grad(fresh, use_kernels):
    base = tiny_model("qwen2")
    model = get_hycam_model(base, _cfg(aux_loss_coef=0.5, use_kernels=use_kernels))
    if not fresh:
        perturb_hycam(model)
    ids, mask, labels = _batch()
    # oracle: task loss + coef * L_aux on the plain graph, with L_aux differentiated through
    # the modules' own statistics (the model's own aux-gradient path switched off)
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(1234)
    model._shared.aux_loss_coef = 0.0
    task = model.base_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    stats = [cam.last_stats.sums() for cam in model.hycam_modules()]
    (task + 0.5 * aux_loss(total(stats))).backward()
    model._shared.aux_loss_coef = 0.5
    oracle = {n: p.grad.detach().clone() for n, p in model.trainable_parameters()}
    for mode in ("plain", "non_reentrant", "reentrant"):
        loss, grads = _grads(model, mode, ids, mask, labels)
        assert set(grads) == set(oracle)
        for n in oracle:
            torch.testing.assert_close(grads[n], oracle[n], atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"{mode} {n}: {m}")
        for i in range(2):
            # at init (B = 0) the router's only gradient is the aux loss's
            assert grads[f"model.layers.{i}.hycam.router_weight"].abs().sum() > 0, (mode, i)


def test_bf16_autocast_router_grad():
    base = tiny_model("llama")
    model = get_hycam_model(base, _cfg(aux_loss_coef=0.5))
    ids, mask, labels = _batch()
    for mode in ("plain", "reentrant"):
        loss, grads = _grads(model, mode, ids, mask, labels, autocast=True)
        assert torch.isfinite(loss)
        for i in range(2):
            assert grads[f"model.layers.{i}.hycam.router_weight"].abs().sum() > 0


def test_save_load_round_trip_bit_exact(tmp_path):
    model = get_hycam_model(tiny_model("llama"), _cfg(train_layernorms=True))
    perturb_hycam(model, seed=7)
    with torch.no_grad():
        for layer in model.base_model.model.layers:
            layer.input_layernorm.weight.add_(0.01)
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert meta["hycam_config"] == model.hycam_config.to_dict()
    from safetensors.torch import load_file
    saved = load_file(str(next(tmp_path.glob("*.safetensors"))))
    assert all(".hycam." in k or "layernorm" in k for k in saved)
    assert not any("q_proj" in k or "embed" in k for k in saved)

    loaded = HyCAMModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    # wrong base model is refused
    with pytest.raises(ValueError):
        HyCAMModel.from_pretrained(tiny_model("llama", hidden=64), str(tmp_path))


def test_disable_adapter_unload_and_merge():
    base = tiny_model("mistral")
    ids, mask, _ = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    keys = list(base.state_dict().keys())
    orig_cls = type(base.model.layers[0])
    model = get_hycam_model(base, _cfg())
    perturb_hycam(model)
    with torch.no_grad():
        changed = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(changed, ref)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, changed)
    with pytest.raises(HyCAMMergeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError):
        model.merge_and_unload()
    back = model.unload()
    assert back is base
    assert type(back.model.layers[0]) is orig_cls
    assert list(back.state_dict().keys()) == keys
    assert all(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, ref)
    # can be converted again after unload
    again = get_hycam_model(back, _cfg())
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, ref)


def test_unsupported_architectures():
    import transformers as tf
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                            n_positions=32))
    with pytest.raises(UnsupportedArchitectureError, match="model_type=.gpt2.*To add a family"):
        get_hycam_model(gpt2, _cfg())
    with pytest.raises(UnsupportedArchitectureError):
        get_hycam_model(torch.nn.Linear(4, 4), _cfg())
    # the base LlamaModel without LM head is not a causal LM either
    with pytest.raises(UnsupportedArchitectureError):
        get_hycam_model(tiny_model("llama").model, _cfg())
    model = get_hycam_model(tiny_model("llama"), _cfg())
    with pytest.raises(ValueError, match="already"):
        get_hycam_model(model.base_model, _cfg())
    with pytest.raises(TypeError):
        get_hycam_model(tiny_model("llama"), {"rank": 4})


def test_accelerate_hooked_layers():
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    base = tiny_model("llama")
    ids, mask, _ = _batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    calls = []

    class Count(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    for layer in base.model.layers:
        accelerate_hooks.add_hook_to_module(layer, Count())
    model = get_hycam_model(base, _cfg())
    assert len(calls) == 4          # the conversion probe: the original layers, then the patched
    perturb_hycam(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 6 and not torch.allclose(out, ref)   # hooks still run, HyCAM active
    back = model.unload()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, ref)
    assert len(calls) == 8


def test_two_forwards_then_backward_reentrant():
    """Reentrant recomputation finds the statistics of its own forward."""
    model = get_hycam_model(tiny_model("llama"), _cfg(aux_loss_coef=0.5))
    perturb_hycam(model)
    a = _batch(seed=1)
    b = _batch(seq=7, seed=2)
    grads = {}
    for mode in ("plain", "reentrant"):
        model.zero_grad(set_to_none=True)
        if mode == "plain":
            model.gradient_checkpointing_disable()
        else:
            model.gradient_checkpointing_enable(use_reentrant=True)
        model.train()
        torch.manual_seed(0)
        la = model(input_ids=a[0], attention_mask=a[1], labels=a[2], use_cache=False).loss
        lb = model(input_ids=b[0], attention_mask=b[1], labels=b[2], use_cache=False).loss
        (la + lb).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["reentrant"][n], g, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_global_aux_scope(tmp_path):
    import subprocess
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "python_tests.integrations.hf_dist_worker", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=worker_env(OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert abs(rep["aux"] - rep["ref_aux"]) < 1e-6
    assert rep["max_grad_err"] < 1e-6
    assert rep["min_router_grad"] > 0


@pytest.mark.parametrize("mode", ["plain", "non_reentrant", "reentrant"])
def test_aux_gradient_in_a_hand_written_loop(mode):
    """A loss computed from the base model's logits (no aux term in it) still gives the router
    coef * dL_aux: the decoder stack's output carries it, under every checkpointing mode."""
    base = tiny_model("llama")
    coef = 0.5
    model = get_hycam_model(base, _cfg(aux_loss_coef=coef))
    perturb_hycam(model)
    ids, mask, labels = _batch()

    def grads(with_node):
        model._shared.aux_loss_coef = coef if with_node else 0.0
        model.zero_grad(set_to_none=True)
        model.train()
        torch.manual_seed(11)
        logits = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
        if not with_node:   # the oracle: the aux term written into the loss by hand
            stats = [cam.last_stats.sums() for cam in model.hycam_modules()]
            loss = loss + coef * aux_loss(total(stats))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.trainable_parameters()}

    oracle = grads(with_node=False)
    if mode != "plain":
        model.gradient_checkpointing_enable(use_reentrant=(mode == "reentrant"))
    got = grads(with_node=True)
    for n in oracle:
        torch.testing.assert_close(got[n], oracle[n], atol=1e-6, rtol=1e-4, msg=n)
    # and load_balancing_loss of such a model is a value for logs (adding it cannot double it)
    assert not hycam_ext.load_balancing_loss(model).requires_grad
