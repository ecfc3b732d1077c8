"""Shared test helpers: random (non-identity) HyCAM parameters and an independent float64 oracle."""
import torch
import torch.nn.functional as F

import hycam_ext


def make_pair(d=17, K=3, r=4, device="cpu", dtype=torch.float64, scale=0.5, **cfg_kw):
    """A HyCAM and a ReferenceHyCAM with the same random, non-trivial parameters."""
    cfg = hycam_ext.HyCAMConfig(hidden_size=d, num_specialists=K, rank=r, **cfg_kw)
    ours = hycam_ext.HyCAM(cfg).to(device=device, dtype=dtype)
    ref = hycam_ext.ReferenceHyCAM(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * scale)
    ref.load_state_dict(ours.state_dict())
    return cfg, ours, ref


def oracle(params, x, h, cfg, g):
    """HyCAM maths written independently of both implementations: einsum over all specialists,
    given routing weights g [T, K]."""
    P = dict(params)
    x2 = x.reshape(-1, cfg.hidden_size)
    z = x2 @ P["shared_weight"].T + (P["shared_bias"] if cfg.bias else 0)
    p = torch.einsum("krd,td->tkr", P["A"], x2) + (P["A_bias"] if cfg.bias else 0)
    w = torch.einsum("kir,tkr->tki", P["N"], p) + (P["N_bias"] if cfg.bias else 0)
    u = torch.einsum("kdr,tkr->tkd", P["B"], w) + (P["B_bias"] if cfg.bias else 0)
    e = F.silu(cfg.scaling * u)
    cam = 1 + F.silu(z) + (g.unsqueeze(-1) * e).sum(1)
    return h * cam.reshape(h.shape)
