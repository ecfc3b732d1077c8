"""Worker for test_cpu_isa.py: runs the four CPU ops in a fresh process, so that HYCAM_CPU_ISA
(read once, at the first op call) picks the variant.

    python cpu_isa_worker.py IN.pt OUT.pt

IN.pt: a list of (name, inputs) cases. OUT.pt: {"isa": the variant used for float32, "cases":
{name: {"full": the outputs of the whole batch, "parts": {(s0, s1): the outputs of tokens s0:s1
alone}}}}. Outputs: p, w (shrink), dx, dA, dA_bias, dN, dN_bias (shrink_backward), out
(cam_forward), d_main, dz, dg, dw, dB, db, dz_bias (cam_backward; z_bias given with the biases).
"""
import sys

import torch

import hycam_ext  # noqa: F401  (registers torch.ops.hycam)

OUTPUTS = ["p", "w", "dx", "dA", "dA_bias", "dN", "dN_bias", "out", "d_main", "dz", "dg", "dw", "dB", "db",
           "dz_bias"]
PER_TOKEN = ["p", "w", "dx", "out", "d_main", "dz", "dg", "dw"]  # rows of the [T, ...] outputs
SLICES = [(0, 5), (3, 20), (1, 2)]


def run(c, sl=slice(None)):
    H = torch.ops.hycam
    x, p_in, h, a, z, go, wv, g, dw = (None if c[k] is None else c[k][sl]
                                       for k in ("x", "p", "h", "a", "z", "go", "w", "g", "dw"))
    p, w = H.shrink(x, c["A"], c["A_bias"], c["N"], c["N_bias"])
    sb = H.shrink_backward(dw, x, p_in, c["A"], c["N"])  # p given: the same in every variant
    out = H.cam_forward(h, a, z, wv, c["B"], c["b"], g, c["scale"], c["placement"], c["zb"])
    cb = H.cam_backward(go, h, a, z, wv, c["B"], c["b"], g, c["scale"], c["placement"], c["zb"])
    return dict(zip(OUTPUTS, [p, w, *sb, out, *cb]))


def main(src, dst):
    cases = torch.load(src)
    res = {}
    for name, c in cases:
        T = c["x"].shape[0]
        parts = {(s0, s1): {k: v for k, v in run(c, slice(s0, s1)).items() if k in PER_TOKEN}
                 for s0, s1 in SLICES if s1 <= T}
        res[name] = {"full": run(c), "parts": parts}
    torch.save({"isa": torch.ops.hycam.cpu_isa(), "cases": res}, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
