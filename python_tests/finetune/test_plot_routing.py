"""benchmarks/plot_routing.py: the table and the figure of MI(task; route) over training."""
import json

import pytest

from benchmarks import plot_routing


def _metrics(mi_by_step):
    return {"routing_diagnostics": [
        {"step": step, "layers": [{"mi": mi, "entropy": 0.5, "shares": [0.5, 0.5], "similarity": float("nan"),
                                   "aux": 0.25} for mi in mis], "mean": {}, "tasks": []}
        for step, mis in mi_by_step]}


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    for name, seed, curve in (("hycam", 0, [(0, [0.0, 0.1]), (10, [0.1, 0.3])]),
                              ("hycam-task", 0, [(0, [0.2, 0.2]), (10, [0.9, 0.7])]),
                              ("hycam-task", 1, [(0, [0.2, 0.2]), (10, [0.5, 0.5])]),
                              ("shared-cam", 0, [])):
        d = tmp_path / f"{name}-seed{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(_metrics(curve)))
    data = plot_routing.load(tmp_path)
    assert set(data) == {"hycam", "hycam-task"}          # shared-cam has no router
    rows = {line.split("|")[1].strip(): line for line in plot_routing.table(data).splitlines()[2:]}
    assert "| 0.200 |" in rows["hycam"]                   # last step, mean over layers
    assert "| 0.650 (0.500-0.800) |" in rows["hycam-task"]  # mean over seeds, min-max
    assert "| 0.700 (0.500-0.900) |" in rows["hycam-task"]  # best layer
    plot_routing.main([str(tmp_path)])
    assert (tmp_path / "routing_mi.png").stat().st_size > 1000


def test_no_routed_variant(tmp_path):
    with pytest.raises(SystemExit, match="no routed variant"):
        plot_routing.load(tmp_path)
