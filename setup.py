"""Build hycam_ext: one extension module, hycam_ext._C (C++ CPU kernels always, CUDA kernels when
nvcc and a CUDA build of torch are present).

Install with `pip install --no-build-isolation .` (the build needs the torch you run with).

Environment switches:
  HYCAM_FORCE_CPU=1          skip the CUDA kernels (fast local iteration; CPU kernels only)
  HYCAM_CUDA_ARCHS="80;90"   compute capabilities to build, explicit -gencode each ("90+PTX" adds PTX)
  CUDA_HOME                  toolkit root; found from nvcc on PATH when unset (wrapper scripts followed)
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


cuda_home = None if _truthy("HYCAM_FORCE_CPU") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None and not _truthy("HYCAM_FORCE_CPU")


def _arch_flags():
    archs = os.environ.get("HYCAM_CUDA_ARCHS", "80;90")
    flags = []
    for a in filter(None, re.split(r"[;, ]+", archs)):
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "").replace(".", "")
        if not a.isdigit():
            sys.exit(f"HYCAM_CUDA_ARCHS: cannot parse '{a}' (expected e.g. '80;90' or '90+PTX')")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{a},code=compute_{a}"]
    if not flags:
        sys.exit("HYCAM_CUDA_ARCHS is empty")
    # torch must not guess an arch list (it cannot without a GPU, and ours is explicit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(
        f"{int(a[:-1])}.{a[-1]}" for a in re.findall(r"sm_(\d+)", " ".join(flags))))
    return flags


def _nvidia_wheel_includes():
    """Headers of torch's nvidia-* wheels (cublas_v2.h, cusparse.h, ...) that ATen's CUDA
    headers include but the toolkit wrapper may not provide."""
    dirs = []
    for sp in sys.path:
        for inc in glob.glob(os.path.join(sp, "nvidia", "*", "include")):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


sources = [os.path.relpath(p, ROOT) for p in sorted(
    glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*", "*_cpu.cpp")))]
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-Werror=return-type",
             "-Werror=unused-variable", "-Werror=unused-but-set-variable"]
define_macros = []
include_dirs = [os.path.join(ROOT, "csrc")]
ext_kwargs = {}
if with_cuda:
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))]
    define_macros.append(("HYCAM_WITH_CUDA", None))
    include_dirs += _nvidia_wheel_includes()
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                  "-Xcompiler", "-Werror=return-type", "-DHYCAM_WITH_CUDA"] + _arch_flags()
    ext = CUDAExtension("hycam_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                        extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("hycam_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

print(f"hycam_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels"
      + (f" (CUDA_HOME={cuda_home})" if with_cuda else ""), file=sys.stderr)

setup(
    name="hycam_ext",
    version="0.1.0",
    description="Fast HyCAM (Hybrid Contextual Attention Modulation) kernels for PyTorch",
    packages=find_packages(include=["hycam_ext", "hycam_ext.*", "benchmarks"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "expecttest", "numpy"],
        "hf": ["transformers>=4.57,<6", "safetensors>=0.4", "peft>=0.17", "gguf>=0.10", "matplotlib"],
        "bench": ["matplotlib", "peft"],
    },
    entry_points={"console_scripts": [
        "hycam-bench=benchmarks.bench:main",
        "hycam-finetune=hycam_ext.finetune:cli",
    ]},
)
