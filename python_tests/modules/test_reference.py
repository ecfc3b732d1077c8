"""ReferenceHyCAM (the oracle) against an independent float64 computation, and the public
behaviour that does not depend on the kernels: config, routing, loss, state-dict conversion."""
import math

import pytest
import torch
import torch.nn.functional as F

import hycam_ext
from python_tests.helpers import gumbel, make_pair, oracle


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hard", [True, False])
def test_reference_matches_oracle(hard, bias):
    cfg, _, ref = make_pair(hard=hard, bias=bias)
    ref.train()
    x, h = torch.randn(2, 5, 17, dtype=torch.float64), torch.randn(2, 5, 17, dtype=torch.float64)
    noise = gumbel((2, 5, 3))
    out = ref(x, h, gumbel_noise=noise)
    logits = x.reshape(-1, 17) @ ref.router_weight.T + ref.router_bias
    y = torch.softmax((logits + noise.reshape(-1, 3)) / cfg.tau, -1)
    g = F.one_hot(y.argmax(-1), 3).double() if hard else y
    expect = oracle(ref.named_parameters(), x, h, cfg, g)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_fresh_layer_is_identity():
    cfg = hycam_ext.HyCAMConfig(hidden_size=16, num_specialists=4, rank=8)
    for cls in (hycam_ext.ReferenceHyCAM, hycam_ext.HyCAM):
        m = cls(cfg)
        x, h = torch.randn(3, 16), torch.randn(3, 16)
        assert torch.equal(m(x, h), h), cls.__name__
        m.eval()
        assert torch.equal(m(x, h), h), cls.__name__


def test_parameter_names_and_shapes():
    cfg = hycam_ext.HyCAMConfig(hidden_size=12, num_specialists=3, rank=5)
    shapes = {n: tuple(p.shape) for n, p in hycam_ext.HyCAM(cfg).named_parameters()}
    assert shapes == {"shared_weight": (12, 12), "shared_bias": (12,), "router_weight": (3, 12),
                      "router_bias": (3,), "A": (3, 5, 12), "A_bias": (3, 5), "N": (3, 5, 5),
                      "N_bias": (3, 5), "B": (3, 12, 5), "B_bias": (3, 12)}
    nb = hycam_ext.HyCAM(hycam_ext.HyCAMConfig(hidden_size=12, num_specialists=3, rank=5, bias=False))
    assert nb.shared_bias is None and nb.A_bias is None and nb.N_bias is None and nb.B_bias is None
    assert nb.router_bias is not None


def test_reference_gradcheck():
    # soft routing: the straight-through estimator is by design not the true derivative
    cfg, _, ref = make_pair(d=7, K=3, r=2, hard=False)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    noise = gumbel((3, 3))
    assert torch.autograd.gradcheck(lambda x, h: ref(x, h, noise), (x, h))


def test_straight_through_gradient():
    """Hard routing: forward value is one-hot, gradient is the soft one's."""
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    noise = gumbel((5, 4))
    g = hycam_ext.route(logits, 0.5, True, True, noise)
    assert torch.equal(g.detach(), F.one_hot(g.detach().argmax(-1), 4).double())
    coef = torch.randn(5, 4, dtype=torch.float64)
    (gl,) = torch.autograd.grad((g * coef).sum(), logits)
    y = torch.softmax((logits + noise) / 0.5, -1)
    (gs,) = torch.autograd.grad((y * coef).sum(), logits)
    torch.testing.assert_close(gl, gs)


@pytest.mark.parametrize("cls", [hycam_ext.ReferenceHyCAM, hycam_ext.HyCAM])
def test_eval_is_deterministic_and_training_samples(cls):
    cfg, ours, ref = make_pair(d=9, K=4, r=3)
    m = ours if cls is hycam_ext.HyCAM else ref
    x, h = torch.randn(64, 9, dtype=torch.float64), torch.randn(64, 9, dtype=torch.float64)
    m.eval()
    assert torch.equal(m(x, h), m(x, h))
    m.train()
    torch.manual_seed(1)
    a = m(x, h)
    torch.manual_seed(1)
    assert torch.equal(a, m(x, h)), "same RNG state must give the same routes"
    assert not torch.equal(a, m(x, h)), "training routing must sample noise"


def test_placements():
    cfg, _, ref = make_pair(placement="attention")
    x, res, a = (torch.randn(4, 17, dtype=torch.float64) for _ in range(3))
    ref.eval()
    cam = ref.cam(x)
    torch.testing.assert_close(ref.placement_forward(x, res, a), res + a * cam)
    ref.cfg.placement = "residual"
    torch.testing.assert_close(ref.placement_forward(x, res, a), (res + a) * cam)


def test_load_balancing_loss_value_and_gradient():
    cfg, ours, ref = make_pair(d=8, K=4, r=2)
    layers = torch.nn.ModuleList([ref, hycam_ext.ReferenceHyCAM(cfg).double()])
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    gs, qs = [], []
    for layer in layers:
        layer.token_mask = mask
        layer(x, x)
        keep = mask.reshape(-1).bool()
        gs.append(layer.last_routes[keep])
        qs.append(torch.softmax(layer.last_router_logits[keep], -1))
    g, q = torch.cat(gs), torch.cat(qs)
    expect = sum(g[:, k].mean() * q[:, k].mean() for k in range(4))
    loss = hycam_ext.load_balancing_loss(layers)
    torch.testing.assert_close(loss, expect)
    assert loss.requires_grad
    loss.backward()
    assert layers[0].router_weight.grad is not None and layers[0].router_weight.grad.abs().sum() > 0
    # a layer in eval mode leaves no statistics behind; all-masked -> finite zero
    for layer in layers:
        layer.token_mask = torch.zeros(2, 6)
        layer(x, x)
    assert torch.isfinite(hycam_ext.load_balancing_loss(layers))


def test_load_balancing_loss_without_statistics_is_zero():
    cfg = hycam_ext.HyCAMConfig(hidden_size=8, num_specialists=2, rank=2)
    assert hycam_ext.load_balancing_loss(torch.nn.ModuleList([hycam_ext.HyCAM(cfg)])).item() == 0.0


def test_convert_official_state_dict():
    d, K, r = 6, 3, 2
    sd = {"model.layers.0.mlp.up.weight": torch.randn(4, d),
          "model.layers.0.self_attn.Shared_CAM_Trans.weight": torch.randn(d, d),
          "model.layers.0.self_attn.Shared_CAM_Trans.bias": torch.randn(d),
          "model.layers.0.self_attn.router_logits_linear.weight": torch.randn(K, d),
          "model.layers.0.self_attn.router_logits_linear.bias": torch.randn(K)}
    for k in range(K):
        for m, shape in (("A", (r, d)), ("N", (r, r)), ("B", (d, r))):
            sd[f"model.layers.0.self_attn.Multi_LC_Trans.{k}.Lora_CAM_{m}.weight"] = torch.randn(shape)
            sd[f"model.layers.0.self_attn.Multi_LC_Trans.{k}.Lora_CAM_{m}.bias"] = torch.randn(shape[0])
    out = hycam_ext.convert_official_state_dict(sd, prefix_map=lambda p: p + "hycam.")
    assert torch.equal(out["model.layers.0.mlp.up.weight"], sd["model.layers.0.mlp.up.weight"])
    pre = "model.layers.0.self_attn.hycam."
    m = hycam_ext.HyCAM(hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r))
    m.load_state_dict({k[len(pre):]: v for k, v in out.items() if k.startswith(pre)})
    assert torch.equal(m.B[2], sd["model.layers.0.self_attn.Multi_LC_Trans.2.Lora_CAM_B.weight"])
    assert torch.equal(m.router_bias, sd["model.layers.0.self_attn.router_logits_linear.bias"])
    del sd["model.layers.0.self_attn.Multi_LC_Trans.1.Lora_CAM_A.weight"]
    with pytest.raises(ValueError, match="Lora_CAM A"):
        hycam_ext.convert_official_state_dict(sd)


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "rank"), (dict(tau=-1.0), "tau"), (dict(placement="mlp"), "placement"),
    (dict(num_specialists=0), "num_specialists"), (dict(hidden_size=2.5), "hidden_size"),
    (dict(alpha=math.inf), "alpha"), (dict(hard="yes"), "hard"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        hycam_ext.HyCAMConfig(**kw)


def test_config_round_trip():
    cfg = hycam_ext.HyCAMConfig(hidden_size=8, rank=2, placement="attention")
    assert hycam_ext.HyCAMConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.scaling == 16.0


def test_placement_enum_and_config():
    """One placement enum for config, ops and C++: RESIDUAL = 0, ATTENTION = 1; the config takes
    the enum or its label and stores the label (JSON round trips as before)."""
    P = hycam_ext.Placement
    assert (int(P.RESIDUAL), int(P.ATTENTION)) == (0, 1)
    assert hycam_ext.config.PLACEMENTS == ("residual", "attention")
    for value, want in (("residual", P.RESIDUAL), ("attention", P.ATTENTION), (P.ATTENTION, P.ATTENTION)):
        cfg = hycam_ext.HyCAMConfig(hidden_size=8, placement=value)
        assert cfg.placement == want.label and cfg.placement_enum is want
        assert hycam_ext.HyCAMConfig.from_dict(cfg.to_dict()) == cfg
    assert P.of(1) is P.ATTENTION and P.of("residual") is P.RESIDUAL
    for bad in ("mlp", 2, True, None):
        with pytest.raises(ValueError, match="placement"):
            hycam_ext.HyCAMConfig(hidden_size=8, placement=bad)


@pytest.mark.parametrize("hard", [True, False])
def test_reference_is_the_torch_path(hard):
    """ReferenceHyCAM is HyCAM on the torch path: the same numbers, bit for bit, as
    HyCAMConfig(use_kernels=False), and its ops are the torch path's."""
    cfg, _, ref = make_pair(hard=hard)
    torch_cfg = hycam_ext.HyCAMConfig(**{**cfg.to_dict(), "use_kernels": False})
    m = hycam_ext.HyCAM(torch_cfg).double()
    m.load_state_dict(ref.state_dict())
    x, h = torch.randn(2, 5, 17, dtype=torch.float64), torch.randn(2, 5, 17, dtype=torch.float64)
    noise = gumbel((2, 5, 3))
    assert torch.equal(ref(x, h, noise), m(x, h, noise))
    assert torch.equal(ref.cam(x, noise), m.cam(x, noise))
    assert hycam_ext.reference.reference_shrink is hycam_ext.torch_path.torch_shrink
    assert hycam_ext.reference.reference_cam is hycam_ext.torch_path.torch_cam
