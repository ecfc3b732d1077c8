"""The PEP 517 build backend of hycam_ext: setuptools' own, made to build against the torch of the
environment being installed into.

Why: the extension compiles against torch's headers and links against its libraries, and a binary
built against one torch only loads into that torch (the C++ ABI changes between releases, and a
CUDA build of torch is a different binary from a CPU one). Listing torch in [build-system].requires
would make pip's default build isolation download a second, possibly different torch (gigabytes)
into a throwaway environment and build against that. Instead:

* ``get_requires_for_build_*`` asks the *target* interpreter whether it has torch. pip runs this
  backend with the target environment's own python (``sys.executable``) and only hides that
  environment's site-packages through ``sys.path``; running ``sys.executable -I`` (isolated mode:
  no PYTHONPATH, so pip's overlay does not apply) sees the target environment as it is. When it has
  torch, nothing more is required; when it has none, ``torch>=2.11`` is added to the build
  requirements, and the same requirement in [project].dependencies installs torch into the target.
* every hook that runs setup.py first appends the target's torch location to ``sys.path`` (after
  the isolated environment's own entries, so the build tools pip installed keep priority), so
  ``import torch`` in setup.py finds the torch the extension will run with. Without build isolation
  (``--no-build-isolation``) torch is importable anyway and this does nothing.

uv's ``match-runtime`` build option solves the same problem the same way.
"""
from __future__ import annotations

import json
import subprocess
import sys

from setuptools import build_meta as _setuptools

TORCH_REQUIREMENT = "torch>=2.11"


def _target_torch():
    """{'version', 'path'} of torch in the environment of sys.executable, or None."""
    probe = ("import json, os, torch; print(json.dumps({'version': torch.__version__, "
             "'path': os.path.dirname(os.path.dirname(torch.__file__))}))")
    try:
        out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _borrow_target_torch() -> None:
    if _torch_importable():
        return  # no isolation, or the build environment installed torch itself
    found = _target_torch()
    if found is None:
        raise RuntimeError(
            "hycam_ext: building needs torch, and neither the build environment nor the target "
            f"environment ({sys.executable}) has it. Install torch first (pip install 'torch>=2.11') "
            "or let pip install it (this message means the build requirements were skipped).")
    if found["path"] not in sys.path:
        sys.path.append(found["path"])
    print(f"hycam_ext: building against torch {found['version']} from {found['path']} "
          "(the target environment's)", file=sys.stderr)


def _requires(extra):
    reqs = list(extra)
    if not _torch_importable() and _target_torch() is None:
        reqs.append(TORCH_REQUIREMENT)
    return reqs


def get_requires_for_build_wheel(config_settings=None):
    return _requires(["wheel"])


def get_requires_for_build_editable(config_settings=None):
    return _requires(["wheel"])


def get_requires_for_build_sdist(config_settings=None):
    return _requires([])


def _with_torch(hook):
    def run(*args, **kwargs):
        _borrow_target_torch()
        return hook(*args, **kwargs)
    run.__name__ = hook.__name__
    run.__doc__ = hook.__doc__
    return run


prepare_metadata_for_build_wheel = _with_torch(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _with_torch(_setuptools.prepare_metadata_for_build_editable)
build_wheel = _with_torch(_setuptools.build_wheel)
build_editable = _with_torch(_setuptools.build_editable)
build_sdist = _with_torch(_setuptools.build_sdist)
