"""benchmarks/bench_r89_model.py's logic on the CPU (--smoke): both variants train through the
trainer's compiled regions (dynamo's eager backend), the switches-on variant unties its embedding,
nothing compiles after the warm-up across the window stages, the untie and the extension stage."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_r89_model  # noqa: E402


@pytest.mark.slow
def test_smoke_run_reports_both_variants_without_recompiles(tmp_path):
    out = tmp_path / "r89.json"
    assert bench_r89_model.main(["--smoke", "--steps", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    on, off = result["variants"]
    assert (on["variant"], off["variant"]) == ("on", "off")
    for r in (on, off):
        assert r["graphs_compiled_after_warmup"] == 0 and r["graphs_after_warmup_total"] > 0
        assert len(r["ms_per_step"]) == 6 and r["ms_per_step_median"] > 0
        assert all(math.isfinite(x) for x in r["train_losses"])
    assert on["untied_after_step"] == 3 and off["untied_after_step"] is None
    assert on["params"] > off["params"]
    assert result["on_over_off_ms"] == pytest.approx(on["ms_per_step_median"] / off["ms_per_step_median"])
