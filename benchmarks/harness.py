"""Timing, memory and ceiling measurements shared by the benchmarks.

GPU: CUDA events, warm-up, median of many repetitions, L2 flushed before every repetition.
CPU: the same loop with perf_counter. Peak memory: torch.cuda.max_memory_allocated on GPU,
the profiler's allocation trace on CPU."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch


class Timer:
    def __init__(self, device: torch.device, warmup: int = 3, reps: int = 20, min_time_s: float = 0.0,
                 warmup_s: float = 0.0):
        self.device = torch.device(device)
        self.warmup, self.reps, self.min_time_s, self.warmup_s = warmup, reps, min_time_s, warmup_s
        self._flush = None
        if self.device.type == "cuda":
            l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
            self._flush = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=self.device)

    def flush(self):
        """Evict the GPU's L2 before a timed repetition (nothing on the CPU)."""
        if self._flush is not None:
            self._flush.zero_()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> Dict[str, float]:
        """Median / min / p80 milliseconds of fn()."""
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        if self.device.type == "cuda":
            for _ in range(self.reps):
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            t_end = time.perf_counter() + self.min_time_s
            while len(times) < self.reps or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"ms": statistics.median(times), "ms_min": times[0], "ms_p80": times[int(0.8 * (len(times) - 1))]}


def _stats(times):
    t = sorted(times)
    n = len(t)

    def q(f):  # linear interpolation between order statistics
        x = f * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        return t[lo] + (t[hi] - t[lo]) * (x - lo)
    return {"ms": q(0.5), "ms_q1": q(0.25), "ms_q3": q(0.75), "ms_min": t[0], "ms_max": t[-1], "reps": n,
            "iqr_rel": (q(0.75) - q(0.25)) / q(0.5) if q(0.5) > 0 else 0.0}


def interleaved(device: torch.device, fns: Dict[str, object], reps: int, warmup: int = 2,
                warmup_s: float = 0.3, flush: Callable[[], None] = None,
                min_time_s: float = 0.0, max_reps: int = 0) -> Dict[str, Dict[str, float]]:
    """Times several variants on a noisy machine: each variant is warmed up (at least `warmup`
    calls and at least `warmup_s` seconds of calls), then the variants' repetitions are
    interleaved round by round (the order rotates every round), so that a slow phase of the
    machine hits every variant alike. Short calls get more rounds: at least `min_time_s` of the
    slowest variant's (warm-up) time, at most `max_reps` rounds. A variant is fn or (setup, fn):
    setup runs untimed before each timed fn (e.g. the forward whose backward is timed). Returns
    per variant the median, quartiles, min and max in ms (see _stats)."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def split(v):
        return v if isinstance(v, tuple) else (None, v)

    def once(v):
        setup, fn = split(v)
        state = setup() if setup else None
        sync()
        if flush is not None:
            flush()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state) if setup else fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(state) if setup else fn()
        return (time.perf_counter() - t0) * 1e3

    names = list(fns)
    slowest = 0.0
    for name in names:
        t_end = time.perf_counter() + warmup_s
        n, last = 0, 0.0
        while n < warmup or time.perf_counter() < t_end:
            last = once(fns[name])
            n += 1
        slowest = max(slowest, last)
    if min_time_s > 0 and slowest > 0:
        reps = max(reps, min(max_reps or reps, int(min_time_s * 1e3 / slowest) + 1))
    times = {n: [] for n in names}
    for i in range(reps):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(once(fns[name]))
    return {n: _stats(t) for n, t in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto prints a start and a stop line to the process's stderr (file descriptor 2, from C++)
    for every profiled region, whatever its log level: stderr is silenced for the profiled region
    only (a Python exception raised in it still propagates and is printed afterwards)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = nbytes // 4
    if torch.device(device).type == "cpu":
        n = min(n, 1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (t["ms"] * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, timer: Timer, m: int, k: int) -> float:
    """Measured dense GEMM rate (FLOP/s) for [m, k] x [k, k] in dtype."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    t = timer(lambda: a @ b)
    return 2 * m * k * k / (t["ms"] * 1e-3)


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
