"""`speedrun bench` on CPU: one row per stage of the schedule, consistent figures, JSON out."""
import json
import math

import pytest
from test_train import micro_config

from speedrun.cli import main


def test_bench_reports_every_window_stage(tmp_path, capsys):
    cfg = micro_config("", "", tmp_path / "run")  # no data: bench makes synthetic shards
    cfg.data.train_path = cfg.data.val_path = ""
    config_file = tmp_path / "micro.json"
    cfg.save(str(config_file))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--config", str(config_file), "--cpu", "--steps", "2", "--skip-steps", "1",
               "--out", str(out), "--profile"])
    assert rc == 0
    result = json.loads(out.read_text())
    # window stages [2, 4] then the extension window 6 (blocks of 16 tokens): three rows
    assert [(r["window_short"], r["window_long"]) for r in result["stages"]] == [(1, 2), (2, 4), (3, 6)]
    assert [(r["stage"], r["first_step"], r["steps"]) for r in result["stages"]] == [(0, 0, 3), (1, 3, 3), (2, 6, 2)]
    for row in result["stages"]:
        assert (row["tokens_per_step"], row["micro_batch_tokens"], row["grad_accum"]) == (512, 256, 2)
        assert row["tokens_per_s"] == pytest.approx(512 / (row["ms_per_step"] / 1e3))
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
    # the schedule average weights the stages by their step counts, so it lies within their range
    rates = [r["tokens_per_s"] for r in result["stages"]]
    assert min(rates) <= result["schedule_avg_tokens_per_s"] <= max(rates)
    assert result["grad_accum"] == 2 and result["world_size"] == 1
    assert result["cold_start_to_first_step_s"] > 0
    assert set(result["setup_phases_s"]) == {"model", "optimizers", "loader"}
    assert result["graphs_compiled_after_warmup"] == 0
    assert result["attention"] == "sdpa"   # auto on the CPU
    # the last timed step's training loss per stage: real numbers from a model that learns
    losses = [r["train_loss"] for r in result["stages"]]
    assert all(0 < x < math.log(cfg.model.padded_vocab_size) + 0.5 for x in losses)
    assert losses[-1] < losses[0]
    trace = json.loads(open(result["profile_trace"]).read())
    assert trace["traceEvents"], "profiler trace is empty"
    printed = capsys.readouterr().out
    assert "schedule-weighted" in printed and "ms/step" in printed


def test_idle_gaps_unions_overlaps_and_names_the_waits():
    from speedrun.bench import idle_gaps
    # two "steps" of kernels (us): overlapping a/b, then a 10 us hole before c, a 2 us hole (below
    # the 5 us threshold: not a gap but not busy either) before d, and a 30 us hole before a2
    spans = [(0, 10, "a"), (5, 20, "b"), (30, 40, "c"), (42, 50, "d"), (80, 100, "a2")]
    r = idle_gaps(spans, steps=2, min_gap_us=5.0)
    assert r["gpu_busy_ms_per_step"] == pytest.approx((20 + 10 + 8 + 20) / 1e3 / 2)
    assert r["gpu_busy_fraction"] == pytest.approx(58 / 100)
    assert r["gpu_idle_ms_per_step"] == pytest.approx((10 + 30) / 1e3 / 2)
    assert [g["where"] for g in r["gpu_idle_gaps"]] == ["d -> a2", "b -> c"]
    assert r["gpu_idle_gaps"][0]["ms_per_step"] == pytest.approx(0.015)
    assert r["gpu_idle_gaps"][1]["count_per_step"] == pytest.approx(0.5)
    assert idle_gaps([], steps=1) == {}


def test_bench_with_record89_attention_reports_dc(tmp_path, capsys):
    """Every record-89 attention switch on (a short end-to-end run: warm-up, stages, validation):
    each stage row carries DC-MHA's forward+backward per step, printed as the dc column."""
    cfg = micro_config("", "", tmp_path / "run")
    cfg.data.train_path = cfg.data.val_path = ""
    m = cfg.model
    m.paired_head_layers, m.key_offset, m.xsa_layers, m.dc_layers = [0], True, [2], [2]
    m.attn_out_gate_layers, m.attn_lambdas, m.dc_window = [2], True, 24
    config_file = tmp_path / "r89.json"
    cfg.save(str(config_file))
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", str(config_file), "--cpu", "--steps", "1", "--skip-steps", "0",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(row["dc_ms"] > 0 and math.isfinite(row["train_loss"]) for row in result["stages"])
    printed = capsys.readouterr().out
    assert " dc" in printed.splitlines()[[i for i, ln in enumerate(printed.splitlines()) if "ms/step" in ln][0]]
    assert "dc: DC-MHA forward+backward per step" in printed


def test_schedule_tokens_per_s_is_total_tokens_over_total_time():
    """Stages weighted by their steps and their batch: 100 steps of 1000 tokens at 10 ms and 50 of
    3000 at 20 ms are 250,000 tokens in 2 s (not the mean of 100k and 150k tokens/s)."""
    from speedrun.bench import schedule_tokens_per_s
    rows = [{"steps": 100, "tokens_per_step": 1000, "ms_per_step": 10.0},
            {"steps": 50, "tokens_per_step": 3000, "ms_per_step": 20.0}]
    assert schedule_tokens_per_s(rows) == pytest.approx(250_000 / 2.0)


@pytest.mark.slow
def test_bench_of_a_stage_table_has_a_row_per_stage(tmp_path):
    from test_train_stages import staged_config

    from speedrun.bench import schedule_tokens_per_s
    cfg = staged_config("", "", tmp_path / "run")
    cfg.data.train_path = cfg.data.val_path = ""
    config_file = tmp_path / "staged.json"
    cfg.save(str(config_file))
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", str(config_file), "--cpu", "--steps", "2", "--skip-steps", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["stages"]
    assert [(r["steps"], r["tokens_per_step"], r["micro_batch_tokens"], r["max_doc_len"], r["window_long"])
            for r in rows] == [(2, 256, 128, 64, 2), (2, 512, 256, 128, 4), (2, 512, 256, 128, 6)]
    assert result["schedule_avg_tokens_per_s"] == pytest.approx(schedule_tokens_per_s(rows))
    assert all(r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["ms_per_step"] / 1e3)) for r in rows)


def _bench_args(argv):
    from speedrun.cli import build_parser
    args, extra = build_parser().parse_known_args(["bench", *argv])
    args.overrides = extra
    return args


def test_bench_picks_the_tiny_recipe_on_a_cpu(capsys, monkeypatch):
    """`speedrun bench` with no arguments on a CPU times the tiny recipe and says how to time the
    record; an explicit --config is kept."""
    import torch

    from speedrun.bench import bench_config
    from speedrun.config import Config, ConfigError
    from speedrun.train.cli import config_path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _bench_args([])
    cfg = bench_config(args)
    assert args.config == "tiny" and cfg.to_dict() == Config.load(config_path("tiny")).to_dict()
    assert "timing the tiny recipe (pass --config record_124m" in capsys.readouterr().err
    args = _bench_args(["--config", "record_124m", "--cpu"])
    assert bench_config(args).model.num_layers == 11 and args.config == "record_124m"
    with pytest.raises(ConfigError, match="--steps 0 --skip-steps 2: expected --steps >= 1"):
        bench_config(_bench_args(["--steps", "0"]))


@pytest.mark.parametrize("command", ["train", "bench"])
def test_help_says_each_default_once_and_describes_every_flag(command, capsys):
    from speedrun.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
    text = sub.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in text.split("\n  -")[1:]:   # one option's help
        assert " ".join(block.split()).lower().count("default") <= 1, block
    if command == "bench":
        for train_only in ("--resume", "--save-every", "--print-config", "--num-gpus", "--overwrite"):
            assert train_only not in text
        assert sub.description
