"""What an install tells the user: the build record and the mismatch error, no silent fallback to
the reference formulation, and the `python -m hycam_ext` self-test."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hycam_ext
from hycam_ext import _extension, _selftest

PKG = Path(hycam_ext.__file__).resolve().parent
ROOT = PKG.parent


def _copy_sources(dest: Path, with_binary: bool) -> Path:
    """A copy of the package's Python files (and, if asked, its binary and build record)."""
    pkg = dest / "hycam_ext"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json"))
    if with_binary:
        for so in PKG.glob("_C*.so"):
            shutil.copy2(so, pkg / so.name)
        shutil.copy2(PKG / "_build_info.json", pkg / "_build_info.json")
    return pkg


# The test environment has hycam_ext installed in editable mode, whose import hook would find the
# checkout's binary for the copy's `hycam_ext._C`: drop that hook so the copy stands alone.
_ALONE = ("import sys\n"
          "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")


def _python(code: str, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYCAM_")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, "-c", _ALONE + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ---- the build record and the mismatch error ------------------------------------------------
def test_build_record_matches_running_torch():
    info = _extension.read_build_info()
    assert info is not None, "_build_info.json missing next to the built package"
    assert info["torch"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["with_cuda"] == hycam_ext.ops.cuda_kernels_available()


@pytest.mark.parametrize("built,built_cuda,running,running_cuda,fragment", [
    ("2.11.0", None, "2.14.1", None, "torch 2.11 vs 2.14"),
    ("2.14.0+cu130", "13.0", "2.14.1+cpu", None, "a CUDA 13.0 torch vs a CPU-only one"),
    ("2.14.0+cpu", None, "2.14.1+cu130", "13.0", "a CPU-only torch vs a CUDA 13.0 one"),
])
def test_build_mismatch_is_described(built, built_cuda, running, running_cuda, fragment):
    why = _extension.build_mismatch({"torch": built, "torch_cuda": built_cuda}, running, running_cuda)
    assert why is not None and fragment in why
    assert built in why and running in why and "pip install" in why


def test_same_minor_and_cuda_kind_is_no_mismatch():
    assert _extension.build_mismatch({"torch": "2.14.0+cu130", "torch_cuda": "13.0"}, "2.14.1+cu130", "13.1") is None


def test_import_refuses_a_binary_built_for_another_torch(tmp_path):
    if not hycam_ext.ops.kernels_available():
        pytest.skip("needs a built extension to copy")
    pkg = _copy_sources(tmp_path, with_binary=True)
    info = json.loads((pkg / "_build_info.json").read_text())
    info["torch"] = "2.9.0"
    (pkg / "_build_info.json").write_text(json.dumps(info))
    res = _python("import hycam_ext", tmp_path)
    assert res.returncode != 0
    assert "ImportError: hycam_ext was built against torch 2.9.0" in res.stderr
    assert f"running with torch {torch.__version__}" in res.stderr


# ---- no silent fallback ------------------------------------------------------------------------
_FORWARD = ("import torch, hycam_ext\n"
            "cfg = hycam_ext.HyCAMConfig(hidden_size=8, num_specialists=2, rank=2{extra})\n"
            "x = torch.randn(3, 8)\n"
            "print('OUT', hycam_ext.HyCAM(cfg)(x, x).shape)\n")


def test_source_tree_without_build_raises_clearly(tmp_path):
    """Python started in a checkout that has no in-place build must not compute through the
    reference: it says why and how to fix it."""
    _copy_sources(tmp_path, with_binary=False)
    (tmp_path / "setup.py").write_text("# stand-in\n")
    (tmp_path / "pyproject.toml").write_text("# stand-in\n")
    res = _python(_FORWARD.format(extra=""), tmp_path)
    assert res.returncode != 0 and "OUT" not in res.stdout
    assert "hycam_ext.KernelsUnavailableError" in res.stderr or "KernelsUnavailableError" in res.stderr
    assert "could not be loaded" in res.stderr
    assert "source tree" in res.stderr and "pip install -e ." in res.stderr
    assert "use_kernels=False" in res.stderr


def test_reference_path_only_when_asked_for(tmp_path):
    _copy_sources(tmp_path, with_binary=False)
    res = _python(_FORWARD.format(extra=", use_kernels=False"), tmp_path)
    assert res.returncode == 0 and "OUT torch.Size([3, 8])" in res.stdout, res.stderr
    res = _python(_FORWARD.format(extra=""), tmp_path, {"HYCAM_USE_REFERENCE": "1"})
    assert res.returncode == 0 and "OUT torch.Size([3, 8])" in res.stdout, res.stderr


def test_ops_raise_without_kernels(monkeypatch):
    monkeypatch.setattr(_extension, "_LOAD_ERROR", ImportError("no _C here"))
    monkeypatch.delenv("HYCAM_USE_REFERENCE", raising=False)
    x = torch.randn(4, 8)
    with pytest.raises(hycam_ext.KernelsUnavailableError, match="no _C here"):
        hycam_ext.ops.shrink(x, torch.randn(2, 3, 8), None, torch.randn(2, 3, 3), None)


def test_reference_env_switch_matches_kernels():
    """HYCAM_USE_REFERENCE=1 computes the same function through the pure-PyTorch path."""
    torch.manual_seed(1)
    cfg = hycam_ext.HyCAMConfig(hidden_size=12, num_specialists=3, rank=4)
    m = hycam_ext.HyCAM(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    noise = torch.randn(5, 3, dtype=torch.float64)
    with_kernels = m(x, x, gumbel_noise=noise)
    os.environ["HYCAM_USE_REFERENCE"] = "1"
    try:
        with_reference = m(x, x, gumbel_noise=noise)
    finally:
        del os.environ["HYCAM_USE_REFERENCE"]
    torch.testing.assert_close(with_kernels, with_reference, rtol=1e-12, atol=1e-12)


# ---- python -m hycam_ext ------------------------------------------------------------------------
def test_selftest_passes_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYCAM_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "hycam_ext", "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hycam_ext self-test:" in res.stdout and " 0 failed" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] == 0 and report["passed"] == len(report["checks"]) >= 80
    names = {c["name"] for c in report["checks"]}
    assert {"shrink fwd+bwd", "cam attention soft", "cam residual (h only) hard"} <= names
    assert {c["dtype"] for c in report["checks"]} == {"fp32", "fp16", "bf16"}


def test_selftest_fails_on_a_wrong_kernel(monkeypatch):
    """The self-test can fail: a CAM kernel off by 0.1% fails every float32 check of it."""
    real = hycam_ext.ops.cam
    monkeypatch.setattr(_selftest.ops, "cam", lambda *a, **k: real(*a, **k) * 1.001)
    checks = _selftest.run_checks(["cpu"], ["fp32"])
    cam_checks = [c for c in checks if c.name.startswith("cam") and c.shape[0] > 0]
    assert cam_checks and not any(c.ok for c in cam_checks)
    assert all(c.ok for c in checks if c.name.startswith("shrink"))


# ---- a CUDA self-test without a usable GPU fails, and a run of zero checks never passes ----------
def test_selftest_cuda_asked_without_gpu_fails_with_reason(tmp_path):
    """`--device cuda` with no GPU visible (hidden here by CUDA_VISIBLE_DEVICES) exits 1 with one
    FAIL line naming why, and runs no check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYCAM_")}
    env["PYTHONPATH"] = str(ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-m", "hycam_ext", "--device", "cuda", "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    fails = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and "cuda: asked for but not usable:" in fails[0], res.stdout
    assert "CPU-only" in fails[0] or "no GPU visible" in fails[0] or "driver" in fails[0], fails[0]
    assert "PASS" not in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] == 1 and report["passed"] == 0 and not report["checks"]
    assert "not usable" in report["error"]


def test_selftest_reason_driver_too_old(monkeypatch):
    """torch's own error for a driver older than its CUDA becomes the one-line reason."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).\n"
                           "Please update your GPU driver by downloading and installing a new version")
    monkeypatch.setattr(torch.cuda, "init", init)
    reason = _selftest.cuda_unusable_reason()
    assert "older than torch" in reason and "12020" in reason and "\n" not in reason
    env = {"gpus": [], "cuda_kernels": True}
    with pytest.raises(SystemExit) as e:
        _selftest.devices_to_test(env, "cuda")
    assert "not usable" in str(e.value.code) and "12020" in str(e.value.code)
    # the default (all devices) tests the CPU and says why CUDA was not tested
    devices, notes = _selftest.devices_to_test(env, "all")
    assert devices == ["cpu"] and "12020" in notes[0]


def test_selftest_cpu_only_torch_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only" in _selftest.cuda_unusable_reason()


def test_selftest_zero_checks_never_pass(monkeypatch, capsys):
    monkeypatch.setattr(_selftest, "run_checks", lambda *a, **k: [])
    assert _selftest.main(["--device", "cpu", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  no checks ran" in out and "0 passed, 1 failed" in out
