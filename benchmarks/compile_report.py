"""Where a cold start's compile time goes: one row per compiled graph from a ``TORCH_TRACE`` directory.

Run the command to attribute with ``TORCH_TRACE=DIR`` (torch's structured trace; every process of
the run writes its own file), then ``python benchmarks/compile_report.py DIR``. Each row is one
dynamo compile (a region or block variant: its function and line, forward seconds, of which
inductor and Triton, and the lazily compiled backward's seconds), per process, longest first, with
each process's totals. Read-only on the trace; prints to stdout.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

_RECORD = re.compile(r'\] (\{"(?:bwd_)?compilation_metrics".*)$')


def read_trace(path: str) -> list[dict]:
    """The compile records of one trace file: {'compile_id', 'where', 'fwd_s', 'inductor_s',
    'triton_s', 'bwd_s', 'bwd_triton_s', 'fail'}; backward records are merged into their forward's."""
    rows: dict[str, dict] = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = _RECORD.search(line)
            if not m:
                continue
            record = json.loads(m.group(1))
            kind, v = next(iter(record.items()))
            cid = str(v.get("compile_id"))
            row = rows.setdefault(cid, {"compile_id": cid, "where": "?", "fwd_s": 0.0, "inductor_s": 0.0,
                                        "triton_s": 0.0, "bwd_s": 0.0, "bwd_triton_s": 0.0, "fail": None})
            if kind == "compilation_metrics":
                row["where"] = f"{v.get('co_name')}:{v.get('co_firstlineno')}"
                row["fwd_s"] += v.get("entire_frame_compile_time_s") or 0.0
                row["inductor_s"] += v.get("inductor_compile_time_s") or 0.0
                row["triton_s"] += (v.get("triton_compile_time_us") or 0) / 1e6
                row["fail"] = v.get("fail_type") or row["fail"]
            else:
                row["bwd_s"] += (v.get("duration_us") or 0) / 1e6
                row["bwd_triton_s"] += (v.get("triton_compile_time_us") or 0) / 1e6
    return list(rows.values())


def report(trace_dir: str) -> str:
    out = []
    for path in sorted(p for p in glob.glob(os.path.join(trace_dir, "*")) if os.path.isfile(p)):
        rows = read_trace(path)
        if not rows:
            continue
        rows.sort(key=lambda r: -(r["fwd_s"] + r["bwd_s"]))
        out.append(f"== {os.path.basename(path)}: {len(rows)} compiles, forward "
                   f"{sum(r['fwd_s'] for r in rows):.1f} s, backward {sum(r['bwd_s'] for r in rows):.1f} s")
        out.append(f"{'id':>7} {'where':<34} {'fwd s':>7} {'induct':>7} {'triton':>7} {'bwd s':>7} "
                   f"{'triton':>7}  fail")
        for r in rows:
            out.append(f"{r['compile_id']:>7} {r['where'][:34]:<34} {r['fwd_s']:7.1f} {r['inductor_s']:7.1f} "
                       f"{r['triton_s']:7.1f} {r['bwd_s']:7.1f} {r['bwd_triton_s']:7.1f}  {r['fail'] or ''}")
    return "\n".join(out) or f"no compile records under {trace_dir}"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python benchmarks/compile_report.py TORCH_TRACE_DIR (a directory)")
    print(report(sys.argv[1]))
