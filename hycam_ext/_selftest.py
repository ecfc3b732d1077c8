"""`python -m hycam_ext`: what is installed, what the binary holds, and a self-test of every op on
every available device against a float64 reference. One PASS/FAIL line per check; exit 1 on any
failure, 2 when the kernels cannot be loaded at all.

Accuracy rule (the one the test suite uses): the error of a result is max|y - y64| / max|y64| over
each output and gradient, y64 the float64 reference on the same inputs. float32 must stay below
1e-5; float16/bfloat16 below twice the error of the reference formulation run in the same dtype
(floored at two units of that dtype's rounding, four on inputs of under 32 elements, so a lucky
low-precision reference does not make the bar unreachable)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _extension, ops
from ._version import __version__
from .reference import reference_cam, reference_shrink

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (T, d, K, r): d = 17 and 9 take the scalar tails, d = 72 the vector paths; T = 1 and 0 edges
SHAPES = [(7, 17, 3, 5), (70, 72, 4, 16), (1, 9, 1, 1), (0, 24, 2, 4)]
FP32_TOL = 1e-5


@dataclasses.dataclass
class Check:
    device: str
    dtype: str
    name: str
    shape: Tuple[int, int, int, int]
    ok: bool
    error: float
    tol: float
    seconds: float
    detail: str = ""

    def line(self) -> str:
        T, d, K, r = self.shape
        status = "PASS" if self.ok else "FAIL"
        what = f"err {self.error:.1e} {'<=' if self.ok else '>'} tol {self.tol:.1e}"
        extra = f"  {self.detail}" if self.detail else ""
        return (f"{status}  {self.device:<5} {self.dtype:<5} {self.name:<28} T={T:<3} d={d:<3} K={K} r={r:<3}"
                f" {what}  ({self.seconds * 1e3:.0f} ms){extra}")


# ---------------------------------------------------------------------------------------------
# what is installed
# ---------------------------------------------------------------------------------------------
def _version_of(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> Dict[str, object]:
    info = _extension.BUILD_INFO or {}
    env: Dict[str, object] = {
        "hycam_ext": __version__,
        "location": os.path.dirname(os.path.abspath(__file__)),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _version_of("transformers"),
        "kernels_loaded": ops.kernels_available(),
        "build": info,
    }
    if ops.kernels_available():
        env["cuda_kernels"] = ops.cuda_kernels_available()
        env["cpu_isa_variants"] = list(torch.ops.hycam.cpu_isa_variants())
        env["cpu_isa_selected"] = torch.ops.hycam.cpu_isa()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    env["gpus"] = gpus
    return env


def _archs_text(info: dict) -> str:
    archs = info.get("cuda_archs") or []
    if not info.get("with_cuda"):
        return "none (CPU-only build)"
    return ", ".join(f"sm_{a['sm']} (SASS{'+PTX' if a.get('ptx') else ''})" for a in archs)


def describe(env: Dict[str, object]) -> List[str]:
    info = env["build"] or {}
    lines = [
        f"hycam_ext {env['hycam_ext']}  ({env['location']})",
        f"python {env['python']}  torch {env['torch']} ({'CUDA ' + env['torch_cuda'] if env['torch_cuda'] else 'CPU-only'})"
        f"  transformers {env['transformers'] or 'not installed'}",
    ]
    if info:
        lines.append(f"binary: built {info.get('built', '?')} against torch {info.get('torch', '?')}"
                     f" on {info.get('platform', '?')}")
        lines.append(f"binary: CUDA kernels {_archs_text(info)}"
                     + (f", toolkit {info['cuda_toolkit']}" if info.get("cuda_toolkit") else ""))
    else:
        lines.append("binary: no build record (_build_info.json) next to the package")
    if env["kernels_loaded"]:
        lines.append(f"binary: CPU kernel variants {', '.join(env['cpu_isa_variants'])}; this CPU runs "
                     f"{env['cpu_isa_selected']} (HYCAM_CPU_ISA overrides; float64 always runs baseline)")
    else:
        lines.append("kernels: NOT LOADED")
    for g in env["gpus"]:
        lines.append(f"gpu {g['index']}: {g['name']} (compute capability {g['capability']}, {g['memory_gib']} GiB)")
    if not env["gpus"]:
        lines.append("gpu: none visible to torch")
    return lines


def cuda_unusable_reason() -> str:
    """Why torch can use no GPU here, in one line: a CPU-only torch, no driver, a driver older than
    this torch's CUDA needs, or no GPU visible (torch.cuda.init() raises the driver's reason)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    try:
        torch.cuda.init()
    except Exception as e:  # torch's message names the driver version it found and what it needs
        first = " ".join(str(e).split())
        low = first.lower()
        if "too old" in low:
            return (f"the NVIDIA driver is older than torch {torch.__version__} (CUDA {torch.version.cuda}) "
                    f"needs: {first}")
        if "no nvidia driver" in low or "found no" in low:
            return f"no NVIDIA driver found: {first}"
        return f"CUDA cannot be initialised: {first}"
    if torch.cuda.device_count() == 0:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no GPU visible to torch" + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else "")
    return "no GPU usable by torch"


def devices_to_test(env: Dict[str, object], wanted: str) -> Tuple[List[str], List[str]]:
    """(devices to test, notes about devices that cannot be tested). Asked for CUDA explicitly
    (`--device cuda`) with no usable GPU: SystemExit with the reason (a failed run, never a pass)."""
    devices, notes = [], []
    if wanted in ("all", "cpu"):
        devices.append("cpu")
    if wanted in ("all", "cuda"):
        if not env["gpus"]:
            reason = cuda_unusable_reason()
            if wanted == "cuda":
                raise SystemExit(f"FAIL  cuda: asked for but not usable: {reason}")
            notes.append(f"cuda: not tested ({reason})")
        elif not env.get("cuda_kernels"):
            msg = "cuda: a GPU is visible but this binary has no CUDA kernels (CPU-only build)"
            if wanted == "cuda":
                raise SystemExit("FAIL  " + msg)
            notes.append(msg + ": rebuild on a machine with nvcc to use it")
        else:
            devices.append("cuda")
    return devices, notes


def arch_problem(env: Dict[str, object]) -> Optional[str]:
    """A GPU the binary has no code for (no SASS for its arch and no PTX at or below it)."""
    info = env["build"] or {}
    if not env.get("cuda_kernels") or not env["gpus"]:
        return None
    cap = int(env["gpus"][0]["capability"].replace(".", ""))
    archs = info.get("cuda_archs") or []
    sass = {int(a["sm"]) for a in archs}
    ptx = [int(a["sm"]) for a in archs if a.get("ptx")]
    if cap in sass or any(p <= cap for p in ptx):
        return None
    return (f"GPU 0 has compute capability {cap // 10}.{cap % 10} but the binary holds SASS for "
            f"{sorted(sass)} and PTX for {ptx or 'none'}: rebuild with HYCAM_CUDA_ARCHS including {cap}")


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
def _rel_error(got: Sequence[Optional[torch.Tensor]], want: Sequence[Optional[torch.Tensor]]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        if a is None or b is None or b.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        if not torch.isfinite(a64).all():
            return float("inf")
        scale = b64.abs().max().item()
        worst = max(worst, (a64 - b64).abs().max().item() / max(scale, 1e-30))
    return worst


def _run(fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[Optional[torch.Tensor]],
         dtype: torch.dtype, cotangent_seed: int) -> List[Optional[torch.Tensor]]:
    """Outputs of fn on the inputs cast to dtype, then the gradients of sum(out * v) w.r.t. every
    floating input (v fixed by the seed, the same for every dtype)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = 0
    for o in outs:
        v = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
        loss = loss + (o * v).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads]


def _shrink_inputs(T, d, K, r, device, gen):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)
    return [rnd(T, d), rnd(K, r, d, scale=d ** -0.5), rnd(K, r, scale=0.1), rnd(K, r, r, scale=r ** -0.5),
            rnd(K, r, scale=0.1)]


def _cam_inputs(T, d, K, r, device, gen, placement, with_a, routing):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)
    logits = rnd(T, K)
    if routing == "hard":
        g = F.one_hot(logits.argmax(-1), K).to(torch.float64) if T else logits.new_zeros(0, K)
    else:
        g = torch.softmax(logits / 0.5, dim=-1)
    a = rnd(T, d) if (with_a or placement == 1) else None
    z_bias = rnd(d, scale=0.5) if with_a else None  # the shared projection's bias, inside the op
    return [rnd(T, d), a, rnd(T, d), rnd(T, K, r), rnd(K, d, r, scale=r ** -0.5), rnd(K, d, scale=0.1), g, z_bias]


def _tolerance(dtype: torch.dtype, ref_err: float, tiny: bool) -> float:
    if dtype == torch.float32:
        return FP32_TOL
    # on a handful of elements one unlucky rounding of an input or of the output decides the max
    # error, whatever the reference's own error was: floor the rule at 2 (tiny: 4) roundings
    return max(2.0 * ref_err, (4.0 if tiny else 2.0) * torch.finfo(dtype).eps)


def _compare(kernel_fn, ref_fn, inputs, dtype, seed) -> Tuple[float, float]:
    want = _run(ref_fn, inputs, torch.float64, seed)
    got = _run(kernel_fn, inputs, dtype, seed)
    err = _rel_error(got, want)
    ref_err = 0.0 if dtype == torch.float32 else _rel_error(_run(ref_fn, inputs, dtype, seed), want)
    return err, _tolerance(dtype, ref_err, tiny=inputs[0].numel() < 32)


def _cases():
    yield "shrink fwd+bwd", "shrink", None
    for placement, with_a, label in ((0, True, "residual (h_in+a)"), (0, False, "residual (h only)"),
                                     (1, True, "attention")):
        for routing in ("hard", "soft"):
            yield f"cam {label} {routing}", "cam", (placement, with_a, routing)


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old


def run_checks(devices: Sequence[str], dtypes: Sequence[str],
               on_result: Callable[[Check], None] = lambda c: None) -> List[Check]:
    results = []
    seed = 0
    for device in devices:
        # on CUDA the half types have two shrink paths (tensor cores by default): test both
        variants = [("", None)]
        if device == "cuda":
            variants.append((" [CUDA cores]", "0"))
        for dname in dtypes:
            dtype = DTYPES[dname]
            for suffix, tc in variants:
                if suffix and dtype == torch.float32:
                    continue
                for name, op, params in _cases():
                    if suffix and op != "shrink":
                        continue
                    for shape in SHAPES:
                        seed += 1
                        gen = torch.Generator().manual_seed(seed)
                        T, d, K, r = shape
                        if op == "shrink":
                            inputs = _shrink_inputs(T, d, K, r, device, gen)
                            kfn = lambda *t: [ops.shrink(*t)]  # noqa: E731
                            rfn = lambda *t: [reference_shrink(*t)]  # noqa: E731
                        else:
                            placement, with_a, routing = params
                            inputs = _cam_inputs(T, d, K, r, device, gen, placement, with_a, routing)
                            kfn = lambda *t, p=placement: [ops.cam(*t[:7], 2.0, p, z_bias=t[7])]  # noqa: E731
                            rfn = lambda *t, p=placement: [reference_cam(  # noqa: E731
                                *t[:2], t[2] if t[7] is None else t[2] + t[7], *t[3:7], 2.0, p)]
                        start = time.perf_counter()
                        try:
                            with _env("HYCAM_TENSOR_CORES", tc):
                                err, tol = _compare(kfn, rfn, inputs, dtype, seed)
                            check = Check(device, dname, name + suffix, shape, err <= tol, err, tol, 0.0)
                        except Exception as e:  # a crash is a failure, reported, not raised
                            check = Check(device, dname, name + suffix, shape, False, float("inf"), 0.0, 0.0,
                                          f"{type(e).__name__}: {e}")
                        if device == "cuda":
                            torch.cuda.synchronize()
                        check.seconds = time.perf_counter() - start
                        results.append(check)
                        on_result(check)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hycam_ext", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", nargs="?", const="-",
                    help="write the report as JSON to PATH ('-' or no value: stdout, instead of the text)")
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated subset of fp32,fp16,bf16")
    args = ap.parse_args(argv)
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    bad = [s for s in dtypes if s not in DTYPES]
    if bad or not dtypes:
        ap.error(f"--dtypes: unknown {bad or 'empty list'}; choose from {','.join(DTYPES)}")
    text = args.json != "-"

    def say(line: str) -> None:
        if text:
            print(line, flush=True)

    env = environment()
    for line in describe(env):
        say(line)
    report = {"environment": env, "checks": [], "notes": []}
    if not env["kernels_loaded"]:
        say("")
        say("FAIL  " + _extension.unavailable_message())
        report.update(passed=0, failed=1, error=_extension.unavailable_message())
        _write_json(args.json, report)
        return 2
    try:
        devices, notes = devices_to_test(env, args.device)
    except SystemExit as e:  # CUDA asked for and not usable: one line, exit 1, no checks
        say("")
        say(str(e.code))
        report.update(passed=0, failed=1, error=str(e.code))
        _write_json(args.json, report)
        if not text:
            print(str(e.code), file=sys.stderr)
        return 1
    problem = arch_problem(env)
    if problem:
        notes.append(problem)
    for n in notes:
        say(n)
    say("")
    start = time.perf_counter()
    checks = run_checks(devices, dtypes, on_result=lambda c: say(c.line()))
    passed = sum(c.ok for c in checks)
    failed = len(checks) - passed + (1 if problem else 0)
    seconds = time.perf_counter() - start
    say("")
    if not checks:  # nothing tested is never a pass
        failed = max(failed, 1)
        notes.append("no checks ran")
        say("FAIL  no checks ran")
    say(f"hycam_ext self-test: {passed} passed, {failed} failed "
        f"({len(checks)} checks on {', '.join(devices)} in {seconds:.1f} s)")
    report.update(checks=[dataclasses.asdict(c) for c in checks], notes=notes, passed=passed,
                  failed=failed, seconds=seconds)
    _write_json(args.json, report)
    return 1 if failed else 0


def _write_json(dest: Optional[str], report: dict) -> None:
    if dest is None:
        return
    blob = json.dumps(report, indent=1, default=str)
    if dest == "-":
        print(blob)
    else:
        with open(dest, "w") as f:
            f.write(blob + "\n")
