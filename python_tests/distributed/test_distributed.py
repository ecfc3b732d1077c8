"""DDP and FSDP2 with 2 gloo processes on CPU (started here with torchrun, bounded in time):
gradients equal the single-process gradients on the same global batch, and the global-scope
load-balancing loss equals the single-process value on the concatenated batch."""
import json
import subprocess
import sys

import pytest
import torch

import hycam_ext
from python_tests.helpers import ROOT, worker_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not hycam_ext.ops.kernels_available(),
                                reason="needs torch.distributed and the built kernels")


def _run(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "python_tests.distributed.dist_worker", str(out), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=worker_env(OMP_NUM_THREADS="1"),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_matches_single_process(tmp_path):
    rep = _run("ddp", tmp_path)
    assert abs(rep["aux"] - rep["ref_aux"]) < 1e-12
    assert rep["max_grad_err"] < 1e-10


def test_fsdp2_matches_single_process(tmp_path):
    rep = _run("fsdp", tmp_path)
    assert rep["max_grad_err"] < 1e-10
