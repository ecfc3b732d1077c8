"""Each custom op against an independent float64 computation: values, gradcheck, opcheck,
dtypes, odd shapes, layouts, determinism, bad input. CPU here; the same tests run on CUDA."""
import pytest
import torch

import hycam_ext
from hycam_ext import ops
from python_tests.helpers import DEVICES, cam_oracle, op_inputs, shrink_oracle

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="hycam_ext._C not built")
SCALE = 1.7


def shrink_inputs(T=7, d=17, K=3, r=4, dtype=torch.float64, device="cpu", bias=True, rg=True):
    def rnd(*s):
        return (torch.randn(*s, dtype=dtype, device=device) * 0.5).requires_grad_(rg)
    return rnd(T, d), rnd(K, r, d), (rnd(K, r) if bias else None), rnd(K, r, r), (rnd(K, r) if bias else None)


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement,with_a", [(0, True), (0, False), (1, True)])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cam_forward_backward_match_oracle(device, placement, with_a, hard, bias):
    args = op_inputs(T=133, d=17, K=3, r=4, device=device, hard=hard, placement=placement, with_a=with_a, bias=bias)
    out = ops.cam(*args, SCALE, placement)
    expect = cam_oracle(*args, SCALE, placement)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    live = [t for t in args if t is not None]
    got = torch.autograd.grad(out, live, go)
    want = torch.autograd.grad(expect, live, go)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement,with_a,hard", [(0, True, False), (0, False, True), (1, True, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cam_z_bias_matches_oracle(device, placement, with_a, hard, dtype):
    """z_bias (the shared projection's bias inside the op): c = 1 + silu(z + z_bias) + ..., and its
    gradient, sum_t dz, from the op's own backward (no separate pass over dz)."""
    args = op_inputs(T=133, d=17, K=3, r=4, device=device, hard=hard, placement=placement, with_a=with_a)
    zb = (torch.randn(17, dtype=torch.float64, device=device) * 0.5).requires_grad_()
    h_in, a, z, w, B, b, g = args
    expect = cam_oracle(h_in, a, z + zb, w, B, b, g, SCALE, placement)
    low = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (*args, zb)]
    out = ops.cam(*low[:7], SCALE, placement, z_bias=low[7])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _err(out, expect) < tol
    go = torch.randn_like(expect)
    live = [t for t in (*args, zb) if t is not None]
    live_low = [t for t in low if t is not None]
    got = torch.autograd.grad(out, live_low, go.to(dtype))
    want = torch.autograd.grad(expect, live, go)
    for gg, ww in zip(got, want):
        assert _err(gg, ww) < tol
    # the op's seventh output is sum_t dz, and empty without z_bias
    res = torch.ops.hycam.cam_backward(go.to(dtype), *[None if t is None else t.detach() for t in low[:7]], SCALE,
                                       placement, low[7].detach())
    assert _err(res[6], res[1].double().sum(0)) < tol
    assert torch.ops.hycam.cam_backward(go.to(dtype), *[None if t is None else t.detach() for t in low[:7]],
                                        SCALE, placement)[6].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cam_z_bias_view_off_alignment(device, dtype):
    """z_bias as a view one element into a flat buffer (as parameters packed by FSDP may be): the
    same results, bitwise, as an aligned copy (CUDA copies it rather than giving up the 16-byte
    accesses of every [T, d] stream)."""
    h, a, z, w, B, b, g = [None if t is None else t.detach().to(dtype)
                           for t in op_inputs(T=40, d=72, K=3, r=8, device=device, hard=True)]
    flat = torch.randn(73, device=device, dtype=dtype)
    view, copy = flat[1:], flat[1:].clone()
    go = torch.randn_like(h)
    assert torch.equal(torch.ops.hycam.cam_forward(h, a, z, w, B, b, g, SCALE, 0, view),
                       torch.ops.hycam.cam_forward(h, a, z, w, B, b, g, SCALE, 0, copy))
    for u, v in zip(torch.ops.hycam.cam_backward(go, h, a, z, w, B, b, g, SCALE, 0, view),
                    torch.ops.hycam.cam_backward(go, h, a, z, w, B, b, g, SCALE, 0, copy)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("T,d,K,r", [(37, 203, 3, 5), (21, 72, 5, 16)])
def test_cam_float32_vector_paths(device, hard, T, d, K, r):
    """float32 runs the vectorised row kernels (float64 does not): the specialist expansion of 1-4
    tokens per pass with 64-, 16- and 8-channel steps and a scalar tail, grouped by route under
    hard routing; every output and gradient within float32 accuracy of the float64 oracle."""
    args64 = op_inputs(T=T, d=d, K=K, r=r, device=device, hard=hard)
    args32 = [None if t is None else t.detach().float().requires_grad_() for t in args64]
    out64, out32 = cam_oracle(*args64, SCALE, 0), ops.cam(*args32, SCALE, 0)
    assert _err(out32, out64) < 1e-5
    go = torch.randn_like(out64)
    live64 = [t for t in args64 if t is not None]
    live32 = [t for t in args32 if t is not None]
    for g32, g64 in zip(torch.autograd.grad(out32, live32, go.float()), torch.autograd.grad(out64, live64, go)):
        assert _err(g32, g64) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_shrink_matches_oracle(device, bias):
    args = shrink_inputs(T=133, device=device, bias=bias)
    w = ops.shrink(*args)
    expect = shrink_oracle(*args)
    torch.testing.assert_close(w, expect, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(w)
    live = [t for t in args if t is not None]
    for gg, ww in zip(torch.autograd.grad(w, live, go), torch.autograd.grad(expect, live, go)):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)


def test_shrink_skips_unrouted_specialists_exactly():
    """Under hard routing dw is zero outside the routed specialist: the result is the same."""
    x, A, Ab, N, Nb = shrink_inputs(T=9)
    dw = torch.randn(9, 3, 4, dtype=torch.float64)
    dw[:, 1] = 0
    dw[3] = 0
    p, _ = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
    got = torch.ops.hycam.shrink_backward(dw, x.detach(), p, A.detach(), N.detach())
    w = shrink_oracle(x, A, Ab, N, Nb)
    want = torch.autograd.grad(w, [x, A, Ab, N, Nb], dw)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 3, 7, 133])
@pytest.mark.parametrize("K,r", [(1, 1), (3, 8), (4, 16)])
@pytest.mark.parametrize("placement", [0, 1])
def test_cam_gradcheck(device, T, K, r, placement):
    if T == 133 and r == 16:
        T = 33  # keep the numerical Jacobian affordable
    h_in, a, z, w, B, b, g = op_inputs(T=T, d=17, K=K, r=r, device=device, placement=placement)
    assert torch.autograd.gradcheck(lambda *t: ops.cam(*t, SCALE, placement), (h_in, a, z, w, B, b, g),
                                    fast_mode=True)
    if T <= 7:  # with z_bias
        zb = (torch.randn(17, dtype=torch.float64, device=device) * 0.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda *t: ops.cam(*t[:7], SCALE, placement, z_bias=t[7]),
                                        (h_in, a, z, w, B, b, g, zb), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 3, 7, 133])
@pytest.mark.parametrize("K,r", [(1, 1), (3, 8), (4, 16)])
def test_shrink_gradcheck(device, T, K, r):
    args = shrink_inputs(T=T, d=17, K=K, r=r, device=device)
    assert torch.autograd.gradcheck(ops.shrink, args, fast_mode=True)


# ------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, bias):
    h_in, a, z, w, B, b, g = op_inputs(T=5, d=9, K=2, r=3, device=device, bias=bias)
    torch.library.opcheck(torch.ops.hycam.cam_forward, (h_in, a, z, w, B, b, g, SCALE, 0))
    torch.library.opcheck(torch.ops.hycam.cam_forward, (h_in, None, z, w, B, b, g, SCALE, 0))
    torch.library.opcheck(torch.ops.hycam.cam_forward, (h_in, a, z, w, B, b, g, SCALE, 1))
    zb = torch.randn(9, dtype=z.dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.hycam.cam_forward, (h_in, a, z, w, B, b, g, SCALE, 0, zb))
    dt = lambda *t: tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in t)  # noqa: E731
    torch.library.opcheck(torch.ops.hycam.cam_backward,
                          dt(torch.randn_like(h_in), h_in, a, z, w, B, b, g) + (SCALE, 0))
    torch.library.opcheck(torch.ops.hycam.cam_backward,
                          dt(torch.randn_like(h_in), h_in, a, z, w, B, b, g) + (SCALE, 1, zb.detach()))
    x, A, Ab, N, Nb = shrink_inputs(T=5, d=9, K=2, r=3, device=device, bias=bias)
    torch.library.opcheck(torch.ops.hycam.shrink, (x, A, Ab, N, Nb))
    p, w2 = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
    torch.library.opcheck(torch.ops.hycam.shrink_backward, dt(torch.randn_like(w2), x, p, A, N))


# ------------------------------------------------------------------------------ dtypes
def _err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cam_dtype_tolerance(device, dtype):
    """float32: rel. error < 1e-5; half types: within 2x the error of the same maths done by
    PyTorch ops in that dtype (both against float64)."""
    args64 = op_inputs(T=64, d=40, K=4, r=16, device=device, requires_grad=False, hard=False)
    exact = cam_oracle(*args64, 2.0, 0)
    low = [None if t is None else t.to(dtype) for t in args64]
    ours = ops.cam(*low, 2.0, 0)
    assert ours.dtype == dtype
    if dtype == torch.float32:
        assert _err(ours, exact) < 1e-5
    else:
        baseline = cam_oracle(*low, 2.0, 0)
        assert _err(ours, exact) <= 2 * _err(baseline, exact) + 1e-7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shrink_dtype_tolerance(device, dtype):
    args64 = shrink_inputs(T=64, d=40, K=4, r=16, device=device, rg=False)
    exact = shrink_oracle(*args64)
    low = [t.to(dtype) for t in args64]
    ours = ops.shrink(*low)
    if dtype == torch.float32:
        assert _err(ours, exact) < 1e-5
    else:
        assert _err(ours, exact) <= 2 * _err(shrink_oracle(*low), exact) + 1e-7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("T,d,K,r", [(37, 203, 3, 5), (30, 72, 4, 16)])
def test_shrink_float32_vector_paths(device, hard, T, d, K, r):
    """float32 shrink forward and backward (register-blocked dots, four-token dx passes under
    dense dw, per-token passes under hard routing, blocked rank updates) against float64."""
    args64 = shrink_inputs(T=T, d=d, K=K, r=r, device=device, rg=True)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    out64, out32 = shrink_oracle(*args64), ops.shrink(*args32)
    assert _err(out32, out64) < 1e-5
    go = torch.randn_like(out64)
    if hard:  # dw zero outside one specialist per token, as hard routing gives
        keep = torch.nn.functional.one_hot(torch.randint(0, K, (T,), device=device), K).to(go.dtype)
        go = go * keep.unsqueeze(-1)
    for g32, g64 in zip(torch.autograd.grad(out32, args32, go.float()), torch.autograd.grad(out64, args64, go)):
        assert _err(g32, g64) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
@pytest.mark.parametrize("T,d,K,r", [(130, 264, 4, 16), (37, 100, 3, 5), (66, 136, 8, 16)])
def test_shrink_half_forward_backward_both_cuda_paths(monkeypatch, dtype, tensor_cores, T, d, K, r):
    """The tensor-core kernels (HYCAM_TENSOR_CORES=1, sm_80+) and the CUDA-core ones (=0) for
    half types, forward and every gradient, by the half-precision rule of docs/kernels.md; d=100 stages operands element
    by element, d=264 with 16-byte copies, K*r=128 spans two tiles."""
    monkeypatch.setenv("HYCAM_TENSOR_CORES", tensor_cores)
    args64 = shrink_inputs(T=T, d=d, K=K, r=r, device="cuda", rg=True)
    low = [t.detach().to(dtype).requires_grad_() for t in args64]
    base = [t.detach().to(dtype).requires_grad_() for t in args64]
    go64 = torch.randn(T, K, r, dtype=torch.float64, device="cuda")
    exact = shrink_oracle(*args64)
    ours = ops.shrink(*low)
    baseline = shrink_oracle(*base)
    assert _err(ours, exact) <= 2 * _err(baseline, exact) + 1e-7
    g_exact = torch.autograd.grad(exact, args64, go64)
    g_ours = torch.autograd.grad(ours, low, go64.to(dtype))
    g_base = torch.autograd.grad(baseline, base, go64.to(dtype))
    for name, o, b, e in zip(["x", "A", "A_bias", "N", "N_bias"], g_ours, g_base, g_exact):
        assert o.dtype == dtype
        assert _err(o, e) <= 2 * _err(b, e) + 1e-7, name


# ------------------------------------------------------------------------------ shapes, layouts
@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    h_in, a, z, w, B, b, g = op_inputs(T=0, d=17, K=3, r=4, device=device)
    out = ops.cam(h_in, a, z, w, B, b, g, SCALE, 0)
    assert out.shape == (0, 17)
    out.sum().backward()
    assert B.grad is not None and torch.equal(B.grad, torch.zeros_like(B))
    x, A, Ab, N, Nb = shrink_inputs(T=0, device=device)
    ww = ops.shrink(x, A, Ab, N, Nb)
    assert ww.shape == (0, 3, 4)
    ww.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    args = op_inputs(T=11, d=17, K=3, r=4, device=device, requires_grad=False)
    nc = [None if t is None else t.transpose(0, -1).contiguous().transpose(0, -1) for t in args]
    assert not nc[0].is_contiguous()
    torch.testing.assert_close(ops.cam(*nc, SCALE, 0), ops.cam(*args, SCALE, 0), rtol=0, atol=0)
    x, A, Ab, N, Nb = shrink_inputs(T=11, device=device, rg=False)
    big = torch.randn(11, 40, dtype=torch.float64, device=device)
    big[:, 3:20] = x
    torch.testing.assert_close(ops.shrink(big[:, 3:20], A, Ab, N, Nb), ops.shrink(x, A, Ab, N, Nb), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_bitwise(device):
    args = op_inputs(T=300, d=70, K=4, r=8, device=device, dtype=torch.float32)
    outs = []
    for _ in range(2):
        for t in args:
            if t is not None:
                t.grad = None
        out = ops.cam(*args, SCALE, 0)
        out.backward(torch.ones_like(out))
        outs.append([out.detach().clone()] + [t.grad.clone() for t in args if t is not None])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("d", [72, 203])
def test_per_token_results_do_not_depend_on_the_batch(device, hard, d):
    """A token's per-token outputs are bitwise the same whichever tokens share its call (kernels
    group tokens into blocks and windows): splitting a batch over ranks or micro-batches, or a
    different thread count, never changes them."""
    T, K, r = 37, 3, 16
    h, a, z, w, B, b, g = [None if t is None else t.detach().float()
                           for t in op_inputs(T=T, d=d, K=K, r=r, device=device, hard=hard)]
    go = torch.randn_like(h)
    x = torch.randn(T, d, device=device)
    A, Ab = torch.randn(K, r, d, device=device) * 0.1, torch.randn(K, r, device=device)
    N, Nb = torch.randn(K, r, r, device=device) * 0.2, torch.randn(K, r, device=device)
    dw = torch.randn(T, K, r, device=device) * (g.unsqueeze(-1) != 0)
    zb = torch.randn(d, device=device)
    cam_f = torch.ops.hycam.cam_forward(h, a, z, w, B, b, g, SCALE, 0, zb)
    cam_b = torch.ops.hycam.cam_backward(go, h, a, z, w, B, b, g, SCALE, 0, zb)
    p, wv = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
    dx = torch.ops.hycam.shrink_backward(dw, x, p, A, N)[0]
    for s0, s1 in ((0, 5), (3, 20), (17, 37), (1, 2)):
        sl = slice(s0, s1)
        assert torch.equal(torch.ops.hycam.cam_forward(h[sl], a[sl], z[sl], w[sl], B, b, g[sl], SCALE, 0, zb),
                           cam_f[sl])
        part = torch.ops.hycam.cam_backward(go[sl], h[sl], a[sl], z[sl], w[sl], B, b, g[sl], SCALE, 0, zb)
        for i in range(4):  # d_main, dz, dg, dw
            assert torch.equal(part[i], cam_b[i][sl]), i
        ps, ws = torch.ops.hycam.shrink(x[sl], A, Ab, N, Nb)
        assert torch.equal(ps, p[sl]) and torch.equal(ws, wv[sl])
        assert torch.equal(torch.ops.hycam.shrink_backward(dw[sl], x[sl], p[sl], A, N)[0], dx[sl])


def test_cpu_results_do_not_depend_on_the_thread_count():
    """DDP ranks under torchrun run one intra-op thread, a single process several: the CPU kernels
    give bitwise the same results either way (fixed token chunks, per-token arithmetic)."""
    T, d, K, r = 301, 200, 4, 16
    h, a, z, w, B, b, g = [None if t is None else t.detach().float() for t in op_inputs(T=T, d=d, K=K, r=r)]
    go, x = torch.randn_like(h), torch.randn(T, d)
    A, Ab, N, Nb = torch.randn(K, r, d) * 0.1, torch.randn(K, r), torch.randn(K, r, r) * 0.2, torch.randn(K, r)
    dw, zb = torch.randn(T, K, r), torch.randn(d)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            p, wv = torch.ops.hycam.shrink(x, A, Ab, N, Nb)
            results.append([torch.ops.hycam.cam_forward(h, a, z, w, B, b, g, SCALE, 0, zb), p, wv,
                            *torch.ops.hycam.cam_backward(go, h, a, z, w, B, b, g, SCALE, 0, zb),
                            *torch.ops.hycam.shrink_backward(dw, x, p, A, N)])
    finally:
        torch.set_num_threads(before)
    for u, v in zip(*results):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_propagate_like_reference(device):
    args = list(op_inputs(T=4, d=17, K=3, r=4, device=device, requires_grad=False))
    args[0][1, 3] = float("nan")
    args[2][2, 5] = float("inf")
    out = ops.cam(*args, SCALE, 0)
    expect = cam_oracle(*args, SCALE, 0)
    assert torch.equal(out.isnan(), expect.isnan()) and torch.equal(out.isinf(), expect.isinf())


# ------------------------------------------------------------------------------ bad input
def test_bad_input_errors_name_the_argument():
    h_in, a, z, w, B, b, g = op_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="z"):
        ops.cam(h_in, a, z[:, :5], w, B, b, g, SCALE, 0)
    with pytest.raises(ValueError, match="w"):
        ops.cam(h_in, a, z, w[:, :2], B, b, g, SCALE, 0)
    with pytest.raises(ValueError, match="g"):
        ops.cam(h_in, a, z, w, B, b, g[:, :1], SCALE, 0)
    with pytest.raises(TypeError, match="z"):
        ops.cam(h_in, a, z.float(), w, B, b, g, SCALE, 0)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.cam(h_in.int(), a, z, w, B, b, g, SCALE, 0)
    with pytest.raises(ValueError, match="placement"):
        ops.cam(h_in, a, z, w, B, b, g, SCALE, 3)
    with pytest.raises(ValueError, match="attention output"):
        ops.cam(h_in, None, z, w, B, b, g, SCALE, 1)
    with pytest.raises(ValueError, match="h_in must be a 2-D"):
        ops.cam(h_in[0], a, z, w, B, b, g, SCALE, 0)
    with pytest.raises(ValueError, match="z_bias"):
        ops.cam(h_in, a, z, w, B, b, g, SCALE, 0, z_bias=z[0, :5])
    with pytest.raises(TypeError, match="z_bias"):
        ops.cam(h_in, a, z, w, B, b, g, SCALE, 0, z_bias=z[0].float())
    x, A, Ab, N, Nb = shrink_inputs(rg=False)
    with pytest.raises(ValueError, match="N has shape"):
        ops.shrink(x, A, Ab, N[:, :2], Nb)
    with pytest.raises(ValueError, match="A has shape"):
        ops.shrink(x[:, :5], A, Ab, N, Nb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to make CUDA tensors")
def test_mixed_devices_error():
    h_in, a, z, w, B, b, g = op_inputs(requires_grad=False)
    with pytest.raises((ValueError, RuntimeError), match="device|CUDA"):
        ops.cam(h_in, a, z.cuda(), w, B, b, g, SCALE, 0)


def test_cuda_flag_is_consistent():
    assert isinstance(ops.cuda_kernels_available(), bool)


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_zero_hidden_size(device):
    """d == 0: w = N a + n (no x term); gradients for the biases and N still flow."""
    x, A, Ab, N, Nb = shrink_inputs(T=5, d=0, K=2, r=3, device=device)
    w = ops.shrink(x, A, Ab, N, Nb)
    expect = shrink_oracle(x, A, Ab, N, Nb)
    torch.testing.assert_close(w, expect)
    go = torch.randn_like(w)
    got = torch.autograd.grad(w, [Ab, N, Nb], go)
    want = torch.autograd.grad(expect, [Ab, N, Nb], go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ projections
def _projection_inputs(device, bias, T=9, d=17, K=3, r=4):
    def rnd(*s):
        return (torch.randn(*s, dtype=torch.float64, device=device) * 0.5).requires_grad_()
    x = rnd(T, d)
    return (x, rnd(d, d), rnd(d) if bias else None, rnd(K, d), rnd(K) if bias else None, rnd(K, r, d),
            rnd(K, r) if bias else None, rnd(K, r, r), rnd(K, r) if bias else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,r", [(3, 4), (5, 2), (2, 2)])  # router slots: 1 padded, 3 padded, 1 exact
def test_projections_one_node_matches_three_ops(device, bias, K, r):
    """The single autograd node (the router as extra shrink slots, dx accumulated in place) gives
    the values and gradients of the three separate maps (F.linear, F.linear, the reference shrink)
    and passes gradcheck."""
    args = _projection_inputs(device, bias, K=K, r=r)
    got = ops.projections(*args)
    want = ops.projections(*args, use_kernels=False)
    gos = [torch.randn_like(t) for t in want]
    live = [t for t in args if t is not None]
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, live, gos)
    g_want = torch.autograd.grad(want, live, gos)
    for gg, ww in zip(g_got, g_want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)
    torch.autograd.gradcheck(lambda *a: ops.projections(*a), args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_projections_partial_grads(device):
    """Only some outputs used, x or the weights frozen: the missing gradients are None or zero
    exactly as autograd of the three separate maps gives them."""
    args = list(_projection_inputs(device, True))
    args[0] = args[0].detach()  # x frozen (the first layer's input)
    z, logits, w = ops.projections(*args)
    (w.sum() + logits.sum()).backward()  # z unused
    assert args[1].grad is None and args[2].grad is None  # W_s, b_s: no gradient reached them
    assert args[3].grad is not None and args[5].grad is not None
    ref = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    _, l2, w2 = ops.projections(*ref, use_kernels=False)
    (w2.sum() + l2.sum()).backward()
    for a, b in zip(args[3:], ref[3:]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("K,r,Kr", [(3, 4, 3), (5, 2, 5), (2, 2, 2), (4, 16, 4), (3, 4, 9)])
@pytest.mark.parametrize("ab,br,nb", [(True, True, True), (False, True, False), (True, False, True),
                                      (False, False, False)])
def test_router_slots_pack_the_extended_weights(K, r, Kr, ab, br, nb):
    """RouterSlots.pack / unpack: the router as S = ceil(K_r / r) slots after the K specialists
    (rows W_r zero padded, bias b_r zero padded, mix identity, mix bias zero), each packed tensor
    ALIGN elements aligned, an absent bias left out only when it is zero in every slot."""
    d = 17
    A, N = torch.randn(K, r, d), torch.randn(K, r, r)
    A_bias, N_bias = (torch.randn(K, r) if ab else None), (torch.randn(K, r) if nb else None)
    W_r, b_r = torch.randn(Kr, d), (torch.randn(Kr) if br else None)
    slots = ops.RouterSlots.of(A, W_r)
    S = -(-Kr // r)
    assert slots.S == S and slots.pad == S * r - Kr
    packed = slots.pack(W_r, b_r, A, A_bias, N, N_bias)
    A_ext, ab_ext, N_ext, nb_ext = slots.unpack(packed, d, ab or br, nb)
    rows = torch.cat([W_r, torch.zeros(S * r - Kr, d)]).view(S, r, d)
    assert torch.equal(A_ext, torch.cat([A, rows]))
    assert torch.equal(N_ext, torch.cat([N, torch.eye(r).expand(S, r, r)]))
    if ab or br:
        bias = torch.cat([b_r if br else torch.zeros(Kr), torch.zeros(S * r - Kr)]).view(S, r)
        assert torch.equal(ab_ext, torch.cat([A_bias if ab else torch.zeros(K, r), bias]))
    else:
        assert ab_ext is None
    assert (nb_ext is None) == (not nb)
    if nb:
        assert torch.equal(nb_ext, torch.cat([N_bias, torch.zeros(S, r)]))
    for t in (A_ext, ab_ext, N_ext, nb_ext):
        if t is not None:
            assert t.is_contiguous() and t.storage_offset() % slots.ALIGN == 0
    # the logits are the slots' w, and join puts the gradients back where split took them
    w_ext = torch.randn(7, K + S, r)
    w, logits = slots.split(w_ext)
    assert torch.equal(w, w_ext[:, :K]) and torch.equal(logits, w_ext[:, K:].reshape(7, -1)[:, :Kr])
    dw_ext = slots.join(w, logits, w_ext)
    assert torch.equal(dw_ext[:, :K], w) and torch.equal(dw_ext.reshape(7, -1)[:, K * r:K * r + Kr], logits)
    assert not dw_ext.reshape(7, -1)[:, K * r + Kr:].any()
