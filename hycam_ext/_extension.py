"""Loading the compiled extension hycam_ext._C, and the checks around it.

* A binary records what it was built against (``_build_info.json``, written by setup.py next to
  it). Loading it into another torch major.minor, or into a CPU torch when it was built against a
  CUDA one (or the reverse), raises ImportError at ``import hycam_ext``: such a binary either fails
  to load with an unreadable linker error or, worse, loads and misbehaves.
* When the binary is missing or does not load, ``import hycam_ext`` still succeeds (the reference
  module, the config and the converters need no kernels), but every kernel-backed call raises
  KernelsUnavailableError with the reason and the fix. Nothing falls back to the reference
  formulation silently: that path runs only when asked for (``HyCAMConfig(use_kernels=False)`` or
  ``HYCAM_USE_REFERENCE=1``).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REBUILD_HINT = "pip install --force-reinstall --no-deps --no-cache-dir ."
REFERENCE_ENV = "HYCAM_USE_REFERENCE"


class KernelsUnavailableError(RuntimeError):
    """hycam_ext._C could not be loaded and the reference path was not asked for."""


def read_build_info(package_dir: str = PACKAGE_DIR) -> Optional[dict]:
    path = os.path.join(package_dir, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImportError(f"hycam_ext: {path} is unreadable ({e}); reinstall hycam_ext "
                          f"({REBUILD_HINT} in a checkout)") from e


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def build_mismatch(info: dict, torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why a binary built as `info` cannot run with this torch, or None when it can."""
    built, running = info.get("torch", "?"), torch_version
    built_kind = f"CUDA {info['torch_cuda']}" if info.get("torch_cuda") else "CPU-only"
    run_kind = f"CUDA {torch_cuda}" if torch_cuda else "CPU-only"
    problems = []
    if _major_minor(built) != _major_minor(running):
        problems.append(f"torch {_major_minor(built)} vs {_major_minor(running)}")
    if bool(info.get("torch_cuda")) != bool(torch_cuda):
        problems.append(f"a {built_kind} torch vs a {run_kind} one")
    if not problems:
        return None
    return (f"hycam_ext was built against torch {built} ({built_kind}) but is running with torch "
            f"{running} ({run_kind}): {'; '.join(problems)}. A compiled extension only works with "
            f"the torch it was built against. Rebuild it for this torch: in a hycam_ext checkout, "
            f"`{REBUILD_HINT}` (with the environment's python).")


def _source_tree_hint() -> str:
    """The common case: Python imports the checkout's hycam_ext/ (current directory first on
    sys.path) instead of the installed package, and the checkout has no in-place build."""
    root = os.path.dirname(PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return (f" Python imported hycam_ext from the source tree {PACKAGE_DIR}, which holds no "
                f"compiled extension: this happens when you start Python in the repository root "
                f"(the current directory comes first on sys.path) after a non-editable install. "
                f"Either run from another directory, or build in place there "
                f"(`pip install -e .`, or `python setup.py build_ext --inplace`).")
    return f" Reinstall hycam_ext for this environment (`{REBUILD_HINT}` in a checkout)."


_LOAD_ERROR: Optional[BaseException] = None
BUILD_INFO = read_build_info()
if BUILD_INFO is not None:
    _why = build_mismatch(BUILD_INFO, torch.__version__, torch.version.cuda)
    if _why is not None:
        raise ImportError(_why)
try:
    from . import _C  # noqa: F401  (loads the library; registers torch.ops.hycam.*)
except ImportError as e:
    _LOAD_ERROR = e


def kernels_available() -> bool:
    return _LOAD_ERROR is None


def reference_requested() -> bool:
    """HYCAM_USE_REFERENCE=1: every HyCAM layer computes through the pure-PyTorch formulation."""
    return os.environ.get(REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def unavailable_message() -> str:
    import glob
    if not glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) and not glob.glob(os.path.join(PACKAGE_DIR, "_C*.pyd")):
        reason = f"there is no compiled _C module in {PACKAGE_DIR}"
    else:
        reason = f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"
    return (f"hycam_ext: the compiled kernels (hycam_ext._C) could not be loaded ({reason})."
            + _source_tree_hint()
            + f" To compute through the (slower, more memory-hungry) pure-PyTorch formulation "
              f"instead, ask for it: HyCAMConfig(use_kernels=False) or {REFERENCE_ENV}=1.")


def require_kernels() -> None:
    if _LOAD_ERROR is not None:
        raise KernelsUnavailableError(unavailable_message())
