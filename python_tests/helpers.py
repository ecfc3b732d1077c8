"""Shared test helpers: random (non-identity) HyCAM parameters and an independent float64 oracle;
where the repository is and how worker processes find it."""
import os
from pathlib import Path

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


import pytest  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def gumbel(shape, dtype=torch.float64, device="cpu"):
    return -torch.empty(shape, dtype=dtype, device=device).exponential_().log()


def op_inputs(T=7, d=17, K=3, r=4, dtype=torch.float64, device="cpu", hard=False, requires_grad=True,
              placement=0, with_a=True, bias=True):
    """Random inputs of the CAM ops: (h_in, a, z, w, B, b, g)."""
    def rnd(*s):
        return (torch.randn(*s, dtype=dtype, device=device) * 0.5).requires_grad_(requires_grad)
    h_in, z, w, B = rnd(T, d), rnd(T, d), rnd(T, K, r), rnd(K, d, r)
    a = rnd(T, d) if (with_a or placement == 1) else None
    b = rnd(K, d) if bias else None
    y = torch.softmax(torch.randn(T, K, dtype=dtype, device=device), -1)
    if hard:
        g = F.one_hot(y.argmax(-1), K).to(dtype)
    else:
        g = y
    g = g.detach().requires_grad_(requires_grad)
    return h_in, a, z, w, B, b, g


def cam_oracle(h_in, a, z, w, B, b, g, scale, placement):
    u = torch.einsum("kdr,tkr->tkd", B, w) + (b if b is not None else 0)
    c = 1 + F.silu(z) + (g.unsqueeze(-1) * F.silu(scale * u)).sum(1)
    if placement == 0:
        return (h_in + (a if a is not None else 0)) * c
    return h_in + a * c


def shrink_oracle(x, A, A_bias, N, N_bias):
    p = torch.einsum("krd,td->tkr", A, x) + (A_bias if A_bias is not None else 0)
    return torch.einsum("kir,tkr->tki", N, p) + (N_bias if N_bias is not None else 0)


ROOT = Path(__file__).resolve().parents[1]   # the repository root
SHARED_DATA = ROOT.parent / "shared" / "data"  # data files beside the repository (CI has them)
# The HyCAM authors' Auto-CoT file (alpaca-format records from their repository): beside the
# checkout in CI and on the dev machines, never inside the repository (README: "Data files").
AUTO_COT = SHARED_DATA / "Auto-CoT.json"
needs_auto_cot = pytest.mark.skipif(
    not AUTO_COT.is_file(),
    reason=f"needs the HyCAM authors' Auto-CoT.json at ../shared/data/ beside the checkout "
           f"({AUTO_COT}), which CI and the dev machines have; it is not part of the repository "
           f"(README, 'Data files')")


def repository_files():
    """The repository's files: tracked ones and untracked ones git would add (not ignored);
    skips the calling test outside a git checkout."""
    import subprocess
    try:
        r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        r = None
    if r is None or r.returncode != 0:
        pytest.skip("not a git checkout (or no git): the repository's file list is unknown")
    return r.stdout.splitlines()


def worker_env(**extra):
    """Environment for a worker started as `python -m python_tests.<area>.<worker>` (cwd=ROOT):
    the checkout first on its path, one OpenMP thread per process unless told otherwise."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env
