"""Build hycam_ext: one extension module, hycam_ext._C (C++ CPU kernels always, CUDA kernels when
nvcc and a CUDA build of torch are present). Metadata lives in pyproject.toml, sources and flags in
buildsys/build_config.py; `pip install .` works with and without build isolation
(buildsys/hycam_backend.py explains how the build finds torch).

Environment switches:
  HYCAM_FORCE_CPU=1          skip the CUDA kernels (fast local iteration; CPU kernels only)
  HYCAM_CUDA_ARCHS="80;90"   compute capabilities to build, explicit -gencode each ("90+PTX" adds PTX)
  CUDA_HOME                  toolkit root; found from nvcc on PATH when unset (wrapper scripts followed)
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "buildsys"))
import build_config as cfg  # noqa: E402


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME from the environment, else from nvcc on PATH. A shell-script nvcc that execs
    the real one (as on some machines) would make torch guess the wrong root: follow it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        m = re.search(rb"exec\s+[\"']?(/[^\s\"']*nvcc)", head)
        if m:
            nvcc = os.path.realpath(m.group(1).decode())
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvidia_wheel_includes():
    """Headers of torch's nvidia-* wheels (cublas_v2.h, cusparse.h, ...) that ATen's CUDA
    headers include but the toolkit wrapper may not provide."""
    dirs = []
    for sp in sys.path:
        for inc in glob.glob(os.path.join(sp, "nvidia", "*", "include")):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


cuda_home = None if _truthy("HYCAM_FORCE_CPU") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None and not _truthy("HYCAM_FORCE_CPU")
try:
    cuda_archs = cfg.parse_cuda_archs(os.environ.get("HYCAM_CUDA_ARCHS", cfg.DEFAULT_CUDA_ARCHS)) if with_cuda else []
except ValueError as e:
    sys.exit(str(e))

sources = cfg.cpu_sources()
include_dirs = [os.path.join(ROOT, d) for d in cfg.INCLUDE_DIRS]
if with_cuda:
    sources += cfg.cuda_sources()
    include_dirs += _nvidia_wheel_includes()
    # torch must not guess an arch list (it cannot without a GPU, and ours is explicit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{int(a[:-1])}.{a[-1]}" for a, _ in cuda_archs))
    ext = CUDAExtension("hycam_ext._C", sources, include_dirs=include_dirs,
                        define_macros=[(cfg.CUDA_DEFINE, None)],
                        extra_compile_args={"cxx": cfg.CXX_FLAGS,
                                            "nvcc": cfg.NVCC_FLAGS + [f"-D{cfg.CUDA_DEFINE}"]
                                            + cfg.gencode_flags(cuda_archs)},
                        extra_link_args=cfg.LINK_FLAGS)
else:
    ext = CppExtension("hycam_ext._C", sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cfg.CXX_FLAGS}, extra_link_args=cfg.LINK_FLAGS)


def build_info():
    """What the binary was built against: hycam_ext/__init__.py refuses to load it into another
    torch (major.minor or CUDA-ness) and `python -m hycam_ext` prints it."""
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_toolkit": _nvcc_version(cuda_home) if with_cuda else None,
        "cuda_archs": [{"sm": a, "sass": True, "ptx": ptx} for a, ptx in cuda_archs],
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class HyCAMBuildExtension(BuildExtension):
    def build_extensions(self):
        super().build_extensions()
        # next to the binary: the build tree for wheels, the source tree for in-place/editable builds
        dirs = {os.path.dirname(self.get_ext_fullpath("hycam_ext._C"))}
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.add(os.path.join(ROOT, "hycam_ext"))  # setuptools copies the binary there afterwards
        info = build_info()
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1, sort_keys=True)


print(f"hycam_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels against torch "
      f"{torch.__version__}" + (f" (CUDA_HOME={cuda_home}, archs {[a for a, _ in cuda_archs]})" if with_cuda else ""),
      file=sys.stderr)

setup(ext_modules=[ext], cmdclass={"build_ext": HyCAMBuildExtension})
