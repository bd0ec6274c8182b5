"""benchmarks/bench_trace_dynamic.py's measurement on the tiny config (dynamo's eager backend): with
every size symbolic the second length reuses the first graphs; with automatic dynamic it compiles a
second set, and both lengths report the frame-compile time they spent."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_trace_dynamic  # noqa: E402


def test_modes_report_compile_time_and_graph_sets():
    rows = {}
    for mode in ("dynamic", "automatic"):
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        rows[mode] = bench_trace_dynamic.run_mode("tiny", mode, [64, 128], "cpu", "eager")
        for r in rows[mode]:
            r["graphs"] -= before
    torch._dynamo.reset()
    dyn, auto = rows["dynamic"], rows["automatic"]
    assert [r["tokens"] for r in dyn] == [64, 128]
    assert dyn[0]["compile_s"] > 0 and dyn[1]["compile_s"] == 0 and dyn[1]["graphs"] == dyn[0]["graphs"] > 0
    assert auto[0]["compile_s"] > 0 and auto[1]["compile_s"] > 0 and auto[1]["graphs"] == 2 * auto[0]["graphs"]
