"""The measuring tools, checked without a GPU: the interleaved timer of benchmarks/harness.py, the
benchmark's rows (spread, stages timed on their own, nothing written without --out), the GPU
suite's report (measurements beside the model's prediction) and the suite's stop without a GPU."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_suite_run, harness

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_interleaved_rotates_and_reports_spread():
    calls = []

    def make(name, s):
        def fn():
            calls.append(name)
            time.sleep(s)
        return fn

    res = harness.interleaved("cpu", {"a": make("a", 0.002), "b": make("b", 0.006)}, reps=7, warmup=1, warmup_s=0.0)
    timed = calls[-14:]  # after the warm-up: rounds of both, the order rotating
    assert sorted(timed) == ["a"] * 7 + ["b"] * 7
    assert timed[0:2] == ["a", "b"] and timed[2:4] == ["b", "a"]
    for name, st in res.items():
        assert st["reps"] == 7
        assert st["ms_min"] <= st["ms_q1"] <= st["ms"] <= st["ms_q3"] <= st["ms_max"]
    assert res["a"]["ms"] < res["b"]["ms"]


def test_interleaved_setup_is_not_timed():
    res = harness.interleaved("cpu", {"x": (lambda: time.sleep(0.02) or 5, lambda s: time.sleep(0.001 * (s - 4)))},
                              reps=5, warmup=1, warmup_s=0.0)
    assert res["x"]["ms"] < 10  # the 20 ms setup is outside the timed region


def test_bench_rows_spread_and_no_files_without_out(tmp_path, monkeypatch):
    pytest.importorskip("hycam_ext")
    import hycam_ext

    if not hycam_ext.ops.kernels_available():
        pytest.skip("hycam_ext._C not built")
    from benchmarks import bench

    results = ROOT / "benchmarks" / "results"
    before = sorted(os.listdir(results))
    monkeypatch.chdir(tmp_path)
    rows = bench.main(["--device", "cpu", "--shapes", "16x32x2x4", "--impls", "hycam,reference", "--reps", "3",
                       "--no-ops"])
    assert sorted(os.listdir(results)) == before and not list(tmp_path.iterdir())
    layer = [r for r in rows if r["kind"] == "layer"]
    stages = {(r["impl"], r["stage"]) for r in layer}
    assert {("hycam", s) for s in ("fwd(no_grad)", "fwd", "bwd", "fwd+bwd")} <= stages
    for r in layer:
        assert r["ms"] > 0 and r["ms_q1"] <= r["ms"] <= r["ms_q3"] and 3 <= r["reps"] <= 12, r
        assert "flag" in r
    hy = {r["stage"]: r for r in layer if r["impl"] == "hycam"}
    lo, hi = hy["fwd+bwd"]["speedup_vs_reference_range"]
    assert lo <= hy["fwd+bwd"]["speedup_vs_reference"] <= hi


@pytest.mark.filterwarnings("ignore:No artists with labels")  # one shape: the plot's line panel is empty
def test_bench_writes_with_out(tmp_path):
    import hycam_ext

    if not hycam_ext.ops.kernels_available():
        pytest.skip("hycam_ext._C not built")
    from benchmarks import bench

    bench.main(["--device", "cpu", "--shapes", "16x32x2x4", "--impls", "hycam,reference", "--reps", "3", "--no-ops",
                "--out", str(tmp_path / "o")])
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert all("ms_q3" in r for r in data["rows"] if r.get("stage") != "error")
    assert "IQR ms" in (tmp_path / "o" / "results.txt").read_text()


def test_gpu_suite_report_puts_the_model_beside_each_measurement(tmp_path):
    model = ROOT / "benchmarks" / "results" / "model-glue-2026-12-07" / "model.json"
    if not model.exists():
        pytest.skip("no committed model run")

    def st(ms):
        return {"ms": ms, "ms_q1": 0.9 * ms, "ms_q3": 1.1 * ms, "ms_min": 0.8 * ms, "ms_max": 1.2 * ms,
                "reps": 30, "iqr_rel": 0.2}
    measured = {"copy (256 MiB fp32)": dict(st(0.18), rate=3.0e12),
                "cuBLAS bf16 [T, d] x [d, d]": dict(st(0.4), rate=690e12),
                "layer fwd+bwd": st(1.9), "cam_forward": st(0.08), "cam_backward": st(0.2), "shrink": st(0.05),
                "shrink_backward": st(0.15)}
    (tmp_path / "measured.json").write_text(json.dumps({"meta": {"device": "NVIDIA H100 80GB HBM3"},
                                                        "measured": measured}))
    (tmp_path / "ncu.csv").write_text(
        '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
        '"0","void hycam::cam_kernels::cam_backward_kernel<c10::BFloat16, float, __nv_bfloat16>(...)",'
        '"dram__bytes_read.sum","Mbyte","300.5"\n'
        '"0","void hycam::cam_kernels::cam_backward_kernel<c10::BFloat16, float, __nv_bfloat16>(...)",'
        '"l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum","","1,234"\n')
    (tmp_path / "SUMMARY.txt").write_text("self-test: rc=0\n")
    res = gpu_suite_run.report(tmp_path, model)
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert res["device"]["device"].startswith("NVIDIA H100") and res["model_machine"] == "H100 SXM"
    L = res["layer"]
    assert L["measured_ms"] == pytest.approx(1.9) and set(L["modelled_ms"]) == {"optimistic", "pessimistic"}
    assert L["floor_ms (measured rates)"] > 1.0 and L["vs_floor"] == pytest.approx(1.9 / L["floor_ms (measured rates)"])
    ops = {r["what"]: r for r in res["ops"]}
    assert set(ops) == {"cam_forward", "cam_backward", "shrink", "shrink_backward"}
    assert ops["cam_backward"]["modelled_us"]["optimistic"] < ops["cam_backward"]["modelled_us"]["pessimistic"]
    (n,) = res["ncu"]
    assert n["kernel"] == "cam_backward_kernel" and n["ncu"]["dram__bytes_read.sum"] == pytest.approx(300.5e6)
    assert n["ncu"]["l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"] == 1234
    assert n["modelled"]["dram_bytes"] > 0 and "smem_conflict_wavefronts" in n["modelled"]


def test_gpu_suite_stops_without_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "s")], env=env,
                       capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "s" / "SUMMARY.txt").read_text()
    assert p.returncode == 1, p.stdout + p.stderr
    assert "CUDA not usable:" in summary and "suite status: FAIL" in summary
    assert not (tmp_path / "s" / "build.log").exists()  # nothing built or measured
