"""benchmarks/compile_report.py: compile records of a TORCH_TRACE file, the backward merged into its
forward's row, longest first, one block per process file."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from compile_report import read_trace, report  # noqa: E402

PREFIX = "V1130 07:53:26.219000 22223 torch/_dynamo/utils.py:2009] "


def _line(kind, **fields):
    return PREFIX + json.dumps({kind: fields}) + "\n"


def test_rows_merge_backward_and_sort(tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "dedicated_log_torch_trace_a.log").write_text(
        _line("compilation_metrics", compile_id="1/0", co_name="forward", co_firstlineno=129,
              entire_frame_compile_time_s=10.0, inductor_compile_time_s=6.0, triton_compile_time_us=2_000_000)
        + PREFIX + '{"chromium_event": {}, "frame_id": 0}\n'
        + _line("compilation_metrics", compile_id="3/0", co_name="_mudd_enter", co_firstlineno=439,
                entire_frame_compile_time_s=30.0, inductor_compile_time_s=25.0, triton_compile_time_us=None,
                fail_type=None)
        + _line("bwd_compilation_metrics", compile_id="1/0", duration_us=4_500_000, triton_compile_time_us=1_000_000))
    (trace / "empty.log").write_text("nothing here\n")
    rows = {r["compile_id"]: r for r in read_trace(str(trace / "dedicated_log_torch_trace_a.log"))}
    assert rows["1/0"]["where"] == "forward:129" and rows["1/0"]["bwd_s"] == 4.5
    assert rows["1/0"]["triton_s"] == 2.0 and rows["1/0"]["bwd_triton_s"] == 1.0
    assert rows["3/0"]["triton_s"] == 0.0                      # null fields count as zero
    text = report(str(trace))
    assert "2 compiles, forward 40.0 s, backward 4.5 s" in text
    lines = text.splitlines()
    assert lines[2].split()[:2] == ["3/0", "_mudd_enter:439"]  # longest first (30 s > 10 + 4.5 s)
    assert "empty.log" not in text
    assert report(str(tmp_path)).startswith("no compile records")
