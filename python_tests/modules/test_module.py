"""HyCAM (kernel path) and HyCAMAttention against ReferenceHyCAM: values and gradients in
float64, both placements, routing modes, memory saved for backward, torch.compile, autocast,
CUDA graphs, bad input."""
import pytest
import torch
import torch.nn as nn

import hycam_ext
from hycam_ext import ops
from hycam_ext.routing_stats import RoutingStats
from python_tests.helpers import DEVICES, ROOT, gumbel, make_pair

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason="hycam_ext._C not built")


def _grads(out, module, inputs, go):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(out, list(inputs) + params, go, allow_unused=True)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,r", [(1, 1), (3, 8), (4, 16)])
@pytest.mark.parametrize("training", [True, False])
def test_hycam_matches_reference(device, hard, bias, K, r, training):
    cfg, ours, ref = make_pair(d=17, K=K, r=r, hard=hard, bias=bias, device=device)
    ours.train(training)
    ref.train(training)
    x = torch.randn(3, 7, 17, dtype=torch.float64, device=device, requires_grad=True)
    h = torch.randn(3, 7, 17, dtype=torch.float64, device=device, requires_grad=True)
    noise = gumbel((3, 7, K), device=device)
    o1, o2 = ours(x, h, noise), ref(x, h, noise)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(o1)
    for a, b in zip(_grads(o1, ours, (x, h), go), _grads(o2, ref, (x, h), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", ["residual", "attention"])
def test_placement_forward_matches_reference(device, placement):
    cfg, ours, ref = make_pair(placement=placement, device=device)
    x, res, a = (torch.randn(2, 5, 17, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    noise = gumbel((2, 5, 3), device=device)
    o1, o2 = ours.placement_forward(x, res, a, noise), ref.placement_forward(x, res, a, noise)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(o1)
    for g1, g2 in zip(_grads(o1, ours, (x, res, a), go), _grads(o2, ref, (x, res, a), go)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-11)


@needs_kernels
@pytest.mark.parametrize("T", [1, 3, 7, 133])
def test_module_gradcheck(T):
    cfg, ours, _ = make_pair(d=17, K=3, r=8, hard=False)
    x = torch.randn(T, 17, dtype=torch.float64, requires_grad=True)
    h = torch.randn(T, 17, dtype=torch.float64, requires_grad=True)
    noise = gumbel((T, 3))
    assert torch.autograd.gradcheck(lambda x, h: ours(x, h, noise), (x, h), fast_mode=True)


@needs_kernels
@pytest.mark.parametrize("hard", [True, False])
def test_saved_tensors_are_linear_in_T(hard):
    """What autograd keeps for backward is O(T*d + T*K*r), never O(K*T*d)."""
    T, d, K, r = 64, 32, 8, 2
    cfg, ours, ref = make_pair(d=d, K=K, r=r, hard=hard, dtype=torch.float32)
    x = torch.randn(T, d, requires_grad=True)
    h = torch.randn(T, d, requires_grad=True)

    def saved_numel(module):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.numel())] = t.numel()  # count each storage view once
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, h)
        return sum(v for v in seen.values())

    ours_n, ref_n = saved_numel(ours), saved_numel(ref)
    params = sum(p.numel() for p in ours.parameters())
    budget = params + 8 * T * d + 4 * T * K * r + 4 * T * K
    assert ours_n <= budget, (ours_n, budget)
    assert ref_n > K * T * d  # the reference does keep [K, T, d] tensors: the check can fail
    assert ours_n < ref_n


@needs_kernels
def test_torch_compile_fullgraph():
    cfg, ours, ref = make_pair(d=16, K=4, r=4, dtype=torch.float32)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.cam = ours

        def forward(self, x, noise):
            return self.cam(x, self.proj(x), noise).sum(-1)

    model = Block()
    x = torch.randn(4, 6, 16, requires_grad=True)
    noise = gumbel((4, 6, 4), dtype=torch.float32)
    eager = model(x, noise)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, noise)
    (gc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


@needs_kernels
def test_autocast_bfloat16_cpu():
    cfg, ours, ref = make_pair(d=16, K=2, r=4, dtype=torch.float32)
    x, h = torch.randn(5, 16), torch.randn(5, 16)
    ours.eval()
    exact = ours(x, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, h)
    assert out.dtype == h.dtype
    assert ((out - exact).abs().max() / exact.abs().max()) < 3e-2
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x, h).sum().backward()
    assert ours.router_weight.grad is not None and ours.router_weight.grad.abs().sum() > 0
    assert ours.B.grad.dtype == torch.float32


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_dtype_tolerance(dtype):
    cfg, ours, ref = make_pair(d=64, K=4, r=16, dtype=torch.float64, scale=0.1)
    ours.eval()
    ref.eval()
    x = torch.randn(32, 64, dtype=torch.float64)
    h = torch.randn(32, 64, dtype=torch.float64)
    exact = ref(x, h)
    o = ours.to(dtype)(x.to(dtype), h.to(dtype))
    rb = ref.to(dtype)(x.to(dtype), h.to(dtype))
    err = lambda a: ((a.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    if dtype == torch.float32:
        assert err(o) < 1e-5
    else:
        assert err(o) <= 2 * err(rb) + 1e-6


def test_hycam_attention_wrapper():
    cfg, ours, ref = make_pair(d=17, placement="residual")

    class Attn(nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale, "weights"

    wrapped = hycam_ext.HyCAMAttention(Attn(), cfg).double().eval()
    wrapped.hycam.load_state_dict(ours.state_dict())
    ref.eval()
    x, res = torch.randn(2, 3, 17, dtype=torch.float64), torch.randn(2, 3, 17, dtype=torch.float64)
    out, extra = wrapped(x, residual=res, scale=2.0)
    assert extra == "weights"
    torch.testing.assert_close(out, ref.placement_forward(x, res, 2.0 * x))
    with pytest.raises(ValueError, match="residual"):
        wrapped(x)
    plain = hycam_ext.HyCAMAttention(lambda x: x + 1, hycam_ext.HyCAMConfig(hidden_size=17, placement="attention"))
    assert isinstance(plain(x.float(), residual=res.float()), torch.Tensor)


def test_hycam_attention_returns_the_wrapped_structure():
    """A tensor for a tensor (the batch is never split by an unpacking meant for a tuple), a
    tuple for a tuple, the same namedtuple type, a list for a list; the first item replaced."""
    import collections
    from hycam_ext.modules import HyCAMAttention
    cfg = hycam_ext.HyCAMConfig(hidden_size=8, num_specialists=2, rank=2, placement="attention")
    x = torch.randn(3, 5, 8)                                  # a batch of 3
    Out = collections.namedtuple("Out", "hidden weights")
    returns = {"tensor": lambda t: t * 2, "tuple": lambda t: (t * 2, "w"),
               "namedtuple": lambda t: Out(t * 2, "w"), "list": lambda t: [t * 2, "w"],
               "return_types": lambda t: torch.sort(t * 2, dim=0)}
    for kind, fn in returns.items():
        seen = []
        wrapped = HyCAMAttention(lambda t, fn=fn: seen.append(fn(t)) or seen[-1], cfg).eval()
        got = wrapped(x)
        raw = seen[-1]                                        # what the attention returned
        assert type(got) is type(raw), kind
        if kind == "tensor":
            assert got.shape == x.shape
            continue
        assert len(got) == len(raw) and all(a is b for a, b in zip(got[1:], raw[1:])), kind
        torch.testing.assert_close(got[0], wrapped.hycam.placement_forward(x, torch.zeros_like(raw[0]),
                                                                            raw[0]))
    assert HyCAMAttention(returns["namedtuple"], cfg)(x).hidden.shape == x.shape
    with pytest.raises(TypeError, match="first item is not a tensor"):
        HyCAMAttention(lambda t: ("w", t), cfg)(x)
    with pytest.raises(TypeError, match="must return a tensor"):
        HyCAMAttention(lambda t: {"hidden": t}, cfg)(x)


def test_readme_unpacks_hycam_attention_as_the_wrapped_module_returns():
    """`hidden, *rest = attn(...)` would silently split the batch of an attention that returns a
    tensor; the README's example unpacks the result as the wrapped module returns it."""
    readme = (ROOT / "README.md").read_text()
    assert "HyCAMAttention(my_attention, cfg)" in readme
    assert "*rest = attn(" not in readme
    assert "hidden = attn(normed, *attn_args, residual=h_in)" in readme


@pytest.mark.parametrize("cls", [hycam_ext.HyCAM, hycam_ext.ReferenceHyCAM])
def test_module_bad_input(cls):
    cfg = hycam_ext.HyCAMConfig(hidden_size=8, num_specialists=2, rank=2)
    m = cls(cfg)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 8\]"):
        m(torch.randn(3, 7), x)
    with pytest.raises(ValueError, match="same shape"):
        m(x, torch.randn(4, 8))
    with pytest.raises(TypeError, match="same dtype"):
        m(x, x.double())
    with pytest.raises(TypeError, match="parameters"):
        m(x.double(), x.double())
    with pytest.raises(ValueError, match="gumbel_noise must have shape"):
        m(x, x, gumbel_noise=torch.randn(3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        m(x.long(), x.long())
    with pytest.raises(TypeError, match="HyCAMConfig"):
        cls({"hidden_size": 8})


@needs_kernels
@pytest.mark.cuda
def test_cuda_graph_capture_matches_eager():
    cfg, ours, _ = make_pair(d=64, K=4, r=8, dtype=torch.float32, device="cuda")
    ours.eval()
    x = torch.randn(128, 64, device="cuda")
    h = torch.randn(128, 64, device="cuda")
    eager = ours(x, h)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ours(x, h)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ours(x, h)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


@needs_kernels
@pytest.mark.cuda
def test_cuda_non_default_stream_and_large_shape():
    cfg, ours, ref = make_pair(d=4096, K=4, r=16, dtype=torch.float32, device="cuda", scale=0.02)
    x = torch.randn(1024, 4096, device="cuda")
    h = torch.randn(1024, 4096, device="cuda")
    noise = gumbel((1024, 4), dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        o1 = ours(x, h, noise)
    torch.cuda.synchronize()
    o2 = ref(x, h, noise)
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_torch_compile_inductor_matches_eager():
    """The default backend (inductor) around the custom ops: same values and gradients."""
    cfg, ours, _ = make_pair(d=16, K=4, r=4, dtype=torch.float32)
    x = torch.randn(4, 6, 16, requires_grad=True)
    h = torch.randn(4, 6, 16)
    noise = gumbel((4, 6, 4), dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True)
    out = compiled(x, h, noise)
    (gc,) = torch.autograd.grad(out.sum(), x)
    eager = ours(x, h, noise)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)
    ours.eval()
    torch.testing.assert_close(compiled(x, h), ours(x, h))


def _trained_with_mask(device="cpu"):
    cfg, ours, _ = make_pair(d=8, K=3, r=2, device=device)
    ours.train()
    ours.token_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], device=device)
    x = torch.randn(2, 4, 8, dtype=torch.float64, device=device)
    ours(x, x)
    return ours


def test_masked_load_balancing_loss_is_data_independent():
    """With a token mask, L_aux needs no value on the host (no boolean indexing, no .item()):
    on meta tensors, which have no data, any data-dependent step raises."""
    ours = _trained_with_mask()
    value = hycam_ext.load_balancing_loss(ours)
    stats = ours.last_stats
    assert stats.token_mask is not None and stats.g.requires_grad
    ours.last_stats = RoutingStats(*(t.detach().to("meta") for t in stats))
    out = hycam_ext.load_balancing_loss(ours)
    assert out.device.type == "meta" and out.shape == value.shape


def test_masked_tokens_do_not_reach_the_loss():
    """A padded token's statistics (here non-finite) are left out, not multiplied by zero."""
    ours = _trained_with_mask()
    clean = hycam_ext.load_balancing_loss(ours)
    logits, g, mask = ours.last_stats
    poisoned = torch.where(mask.unsqueeze(-1) == 0, float("nan"), logits)
    ours.last_stats = RoutingStats(poisoned, torch.where(mask.unsqueeze(-1) == 0, float("inf"), g),
                                   mask)
    torch.testing.assert_close(hycam_ext.load_balancing_loss(ours), clean)


@needs_kernels
@pytest.mark.cuda
def test_cuda_masked_load_balancing_loss_does_not_sync():
    ours = _trained_with_mask("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = hycam_ext.load_balancing_loss(ours)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.cpu())
