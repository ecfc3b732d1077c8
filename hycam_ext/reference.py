"""The reference: the torch path (torch_path.py) used as the oracle.

``ReferenceHyCAM`` is the HyCAM layer computed on the torch path whatever ``use_kernels`` says:
the same module as ``HyCAM``, the same maths as ``HyCAMConfig(use_kernels=False)``, and what the
tests check the kernels against (run in float64) and the benchmarks time as the plain-PyTorch
baseline. ``reference_shrink`` and ``reference_cam`` are the torch path's shrink and CAM under
their oracle names. There is no other pure-PyTorch writing of the maths: the tests' independent
float64 check of the torch path itself is python_tests/helpers.py's ``oracle``."""
from __future__ import annotations

from .config import HyCAMConfig
from .modules import HyCAM
from .torch_path import torch_cam, torch_shrink

# the torch path's ops, as the oracle: (x, A, A_bias, N, N_bias) -> w [T, K, r] and
# (h_in, a, z, w, B, b, g, scale, placement=RESIDUAL, z_bias=None) -> the modulated stream
reference_shrink = torch_shrink
reference_cam = torch_cam


class ReferenceHyCAM(HyCAM):
    """HyCAM on the torch path (never the kernels). forward(x, h, gumbel_noise=None) -> h * CAM(x);
    ``cam(x)``, ``placement_forward(x, h_in, a)`` as HyCAM's."""

    def __init__(self, cfg: HyCAMConfig, device=None, dtype=None):
        if isinstance(cfg, HyCAMConfig) and cfg.routing != "token":
            raise ValueError("ReferenceHyCAM: the authors' formulation routes per token "
                             "(routing='token'); HyCAMConfig(use_kernels=False) computes task "
                             "routing in plain PyTorch")
        super().__init__(cfg, device=device, dtype=dtype)

    def _use_kernels(self) -> bool:
        return False
