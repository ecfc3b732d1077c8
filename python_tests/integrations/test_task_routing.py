"""Task-aware routing (beyond the paper): HyCAMConfig(routing="task", num_tasks=N) through the
HF integration and PEFT; the router learning-rate groups; the routing diagnostics."""
import math

import pytest
import torch

pytest.importorskip("transformers")

import hycam_ext  # noqa: E402
from hycam_ext.integrations.transformers import HyCAMModel, get_hycam_model  # noqa: E402

from python_tests.hf_tiny import tiny_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),   # but peft's own:
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _task_cfg(**kw):
    return hycam_ext.HyCAMConfig(**dict(dict(num_specialists=2, rank=4, routing="task",
                                             num_tasks=2, aux_loss_coef=0.0), **kw))


def test_config_and_bad_task_ids():
    with pytest.raises(ValueError, match="num_tasks"):
        hycam_ext.HyCAMConfig(routing="task")
    with pytest.raises(ValueError, match="routing"):
        hycam_ext.HyCAMConfig(routing="sequence")
    with pytest.raises(ValueError, match="num_tasks is only used"):
        hycam_ext.HyCAMConfig(num_tasks=3)
    model = get_hycam_model(tiny_model("llama"), _task_cfg())
    ids = torch.randint(3, 128, (2, 5))
    assert model.base_model.model.layers[0].hycam.router_weight is None
    with pytest.raises(ValueError, match="pass task_ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="1-D integer"):
        model(input_ids=ids, task_ids=torch.tensor([0.0, 1.0]))
    token = get_hycam_model(tiny_model("llama"), hycam_ext.HyCAMConfig(num_specialists=2, rank=4))
    with pytest.raises(ValueError, match="routes per token"):
        token(input_ids=ids, task_ids=torch.tensor([0, 1]))


def _model(cfg):
    """A tiny random Llama with larger weights than transformers' default (std 0.3 instead of
    0.02), so that its logits are far from uniform and a gate can move them."""
    import transformers as tf
    from python_tests.hf_tiny import tiny_config
    c = tiny_config("llama")
    c.initializer_range = 0.3
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(c).eval()
    torch.manual_seed(0)
    return get_hycam_model(base, cfg)


def _conflicting_batch(model):
    """Conflicting tasks: the same 8 sequences twice, as task 0 and as task 1; the labels are
    the base model's own first choice of next token for task 0 and its second choice for task 1.
    Nothing in the input tells the tasks apart, so without the task the best possible mean loss
    on each pair is log 2."""
    ids = torch.randint(10, 128, (8, 6), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    task = torch.arange(16) // 8
    with torch.no_grad(), model.disable_adapter():
        top2 = model(input_ids=ids).logits.topk(2, dim=-1).indices
    pick = torch.where(task[:, None] == 0, top2[..., 0], top2[..., 1])
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = pick[:, :-1]
    return ids, task, labels


def _train(model, task_routed, steps=40, lr=2e-2):
    ids, task, labels = _conflicting_batch(model)
    kw = {"task_ids": task} if task_routed else {}
    opt = torch.optim.Adam(hycam_ext.hycam_param_groups(model, lr, router_lr_scale=10.0))
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        model(input_ids=ids, labels=labels, **kw).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=labels, **kw).loss.item()


def test_task_routing_learns_what_the_shared_cam_cannot(tmp_path):
    shared_only = _model(hycam_ext.HyCAMConfig(num_specialists=2, rank=4, aux_loss_coef=0.0))
    for n, p in shared_only.trainable_parameters():
        if not n.rsplit(".", 1)[-1].startswith("shared"):
            p.requires_grad_(False)
    routed = _model(_task_cfg())
    loss_shared = _train(shared_only, task_routed=False)
    loss_routed = _train(routed, task_routed=True)
    # the shared CAM is bounded by log 2 (it cannot see the task); task routing goes well below
    assert loss_shared >= math.log(2) - 1e-4
    assert loss_routed < 0.75 * math.log(2), (loss_routed, loss_shared)
    # the two tasks went to different specialists in every layer
    for layer in routed.base_model.model.layers:
        assert sorted(layer.hycam.task_logits.argmax(-1).tolist()) == [0, 1]
    # outputs depend on task_ids; generation takes them
    ids = _conflicting_batch(routed)[0][:2]
    with torch.no_grad():
        a = routed(input_ids=ids, task_ids=torch.tensor([0, 0])).logits
        b = routed(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
    assert not torch.allclose(a, b)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    g0 = routed.generate(ids, task_ids=torch.tensor([0, 0]), **gen)
    g1 = routed.generate(ids, task_ids=torch.tensor([1, 1]), **gen)
    assert g0.shape == g1.shape == (2, 9) and not torch.equal(g0, g1)
    # save / load keeps the task-to-specialist logits
    routed.save_pretrained(str(tmp_path))
    fresh = _model(hycam_ext.HyCAMConfig(num_specialists=2, rank=4)).unload()
    loaded = HyCAMModel.from_pretrained(fresh, str(tmp_path))
    assert loaded.hycam_config.routing == "task" and loaded.hycam_config.num_tasks == 2
    for x, y in zip(loaded.hycam_modules(), routed.hycam_modules()):
        assert torch.equal(x.task_logits, y.task_logits)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, task_ids=torch.tensor([0, 1])).logits,
                           routed(input_ids=ids, task_ids=torch.tensor([0, 1])).logits)


def test_task_routing_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from hycam_ext.integrations.peft import HyCAMPeftConfig
    model = peft.get_peft_model(tiny_model("qwen2"),
                                HyCAMPeftConfig(num_specialists=2, rank=4, routing="task",
                                                num_tasks=3))
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(ValueError, match="pass task_ids"):
        model(input_ids=ids)
    model.train()
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.base_model.model.model.layers[0].hycam.task_logits.grad is not None
    model.eval()
    gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                         task_ids=torch.tensor([1, 2]))
    assert gen.shape == (2, 7)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_model("qwen2"), str(tmp_path))
    assert loaded.peft_config["default"].routing == "task"


def test_param_groups_and_diagnostics():
    model = get_hycam_model(tiny_model("llama"),
                            hycam_ext.HyCAMConfig(num_specialists=3, rank=4))
    groups = hycam_ext.hycam_param_groups(model, 1e-3, router_lr_scale=10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())
    assert len(groups[1]["params"]) == 4           # router weight and bias of 2 layers
    with pytest.raises(ValueError, match="router_lr_scale"):
        hycam_ext.hycam_param_groups(model, 1e-3, router_lr_scale=0)
    # diagnostics of two tasks routed to disjoint specialists: MI 1; identical routes: MI 0
    K = 3
    def fake(dist):
        d = torch.tensor([dist, dist])
        return {"dist": d, "q_dist": d, "tokens": [10.0, 10.0]}
    cams = model.hycam_modules()
    split = hycam_ext.routing_diagnostics({"a": fake([1.0, 0, 0]), "b": fake([0, 1.0, 0])}, cams)
    same = hycam_ext.routing_diagnostics({"a": fake([0.5, 0.5, 0]), "b": fake([0.5, 0.5, 0])}, cams)
    assert split["mean"]["mi"] == pytest.approx(1.0) and same["mean"]["mi"] == pytest.approx(0.0)
    assert split["layers"][0]["shares"] == pytest.approx([0.5, 0.5, 0.0])
    assert split["mean"]["entropy"] == pytest.approx(math.log(2) / math.log(K))
    assert split["mean"]["aux"] == pytest.approx(0.5)
    assert math.isnan(split["mean"]["similarity"])     # B = 0 at initialisation
    # real collected routing: eval routes of a perturbed model
    from python_tests.hf_tiny import perturb_hycam
    perturb_hycam(model)
    model.eval()
    per_task = {}
    for t in range(2):
        with model.collect_routing() as r, torch.no_grad():
            model(input_ids=torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(t)))
        per_task[f"t{t}"] = r
    diag = hycam_ext.routing_diagnostics(per_task, model.hycam_modules())
    for layer in diag["layers"]:
        assert 0.0 <= layer["mi"] <= 1.0 and 0.0 <= layer["entropy"] <= 1.0
        assert sum(layer["shares"]) == pytest.approx(1.0)
        assert -1.0 <= layer["similarity"] <= 1.0 and 0.0 < layer["aux"] <= 1.0
