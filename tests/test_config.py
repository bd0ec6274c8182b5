"""Config tree: recipes load, overrides parse by type, bad values fail naming the field."""
import json

import pytest

from speedrun.config import Config, ConfigError
from speedrun.train.cli import build_config, config_path, parse_overrides


def test_record_recipe_matches_the_spec():
    cfg = Config.load(config_path("record_124m")).validate()
    assert cfg.train.tokens_per_step == 262144 and cfg.train.sequence_tokens == 32768
    assert cfg.schedule.total_steps == 2225 and cfg.schedule.num_scheduled_steps == 2185
    assert cfg.train.val_tokens == 10485760 and cfg.train.val_every == 250
    assert cfg.model.padded_vocab_size == 50304
    assert cfg.model.num_value_embeds == 3
    assert [i for i in range(11) if not cfg.model.has_attention(i)] == [6]
    # world size and accumulation are derived: 8 GPUs x 1 = 1 GPU x 8
    assert cfg.grad_accum(8) == 1 and cfg.grad_accum(1) == 8 and cfg.grad_accum(2) == 4


def test_world_size_must_divide_the_batch():
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        Config().grad_accum(3)


def test_overrides_are_parsed_as_the_field_type():
    cfg = Config()
    cfg.override(parse_overrides(["--optim.muon.lr", "0.02", "--model.smear=false",
                                  "--schedule.window_stages", "[1,2,3]", "--train.seed", "7"]))
    assert cfg.optim.muon.lr == 0.02 and cfg.model.smear is False
    assert cfg.schedule.window_stages == [1, 2, 3] and cfg.train.seed == 7


@pytest.mark.parametrize("key,value,message", [
    ("optim.muon.lrr", "1", "unknown config field 'optim.muon.lrr'"),
    ("optim.muon.lr", "fast", "'optim.muon.lr': cannot parse 'fast' as float"),
    ("train.seed", "1.5", "'train.seed': expected int"),
    ("optim", "1", "is a section"),
])
def test_bad_overrides_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config().override({key: value})


@pytest.mark.parametrize("section,field,value,expected", [
    ("model", "head_dim", 100, "num_heads\\*head_dim"),
    ("train", "sequence_tokens", 30000, "a divisor of train.tokens_per_step"),
    ("model", "attention_backend", "magic", "one of auto, flex, flash, sdpa"),
    ("train", "val_tokens", 1000, "train.val_tokens"),
    ("schedule", "window_stages", [], "schedule.window_stages"),
])
def test_validation_names_the_field(section, field, value, expected):
    cfg = Config()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=expected):
        cfg.validate()


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"num_layers": "eleven"}}')
    with pytest.raises(ConfigError, match=r"bad.json: config field 'model.num_layers': expected int"):
        Config.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        Config.load(bad)
    with pytest.raises(ConfigError, match="missing.json: config file not found"):
        Config.load(tmp_path / "missing.json")
    bad.write_text('{"modle": {}}')
    with pytest.raises(ConfigError, match="unknown config field 'modle'"):
        Config.load(bad)


def test_save_load_round_trip(tmp_path):
    cfg = Config()
    cfg.optim.adam.lr = 0.123
    cfg.save(tmp_path / "c.json")
    again = Config.load(tmp_path / "c.json")
    assert again == cfg
    assert json.loads((tmp_path / "c.json").read_text())["optim"]["adam"]["lr"] == 0.123


def _train_args(argv):
    from speedrun.cli import build_parser
    parser = build_parser()
    args, extra = parser.parse_known_args(["train", *argv])
    args.overrides = extra
    return args


def test_brief_flags_map_onto_the_config():
    args = _train_args(["--config", "record_124m", "--data-path", "d/*.bin", "--val-data-path", "v.bin",
                        "--save-path", "out", "--use-flash-attn", "--no-fp8", "--memory-pool",
                        "--save-every", "100", "--optim.adam.lr", "0.01"])
    cfg = build_config(args)
    assert cfg.data.train_path == "d/*.bin" and cfg.data.val_path == "v.bin"
    assert cfg.train.save_path == "out" and cfg.train.save_every == 100
    assert cfg.model.attention_backend == "flash" and cfg.model.fp8_head is False
    assert cfg.train.memory_pool and cfg.optim.adam.lr == 0.01


def test_contradicting_flags_fail():
    with pytest.raises(ConfigError, match="contradict"):
        build_config(_train_args(["--cuda", "--cpu"]))


def test_cuda_flag_without_gpu_fails_clearly(monkeypatch):
    import torch

    from speedrun.train.trainer import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config(_train_args(["--cuda"]))
    with pytest.raises(ConfigError, match="cuda was requested but no CUDA GPU is visible"):
        resolve_device(cfg)


R89_ATTENTION = dict(paired_head_layers=[0, 2, 5, 9], key_offset=True, xsa_layers=[1, 3, 4, 7],
                     dc_layers=[10], attn_out_gate_layers=[3, 10], attn_lambdas=True)


def test_record89_attention_switches_default_off_and_validate():
    m = Config().model
    assert (m.paired_head_layers, m.key_offset, m.xsa_layers, m.dc_layers, m.attn_out_gate_layers,
            m.attn_lambdas, m.dc_window) == ([], False, [], [], [], False, 112)
    cfg = Config()
    for k, v in R89_ATTENTION.items():
        setattr(cfg.model, k, v)
    cfg.validate()                                   # record 89's layer lists are accepted


@pytest.mark.parametrize("field,value,expected", [
    ("xsa_layers", [11], "model.xsa_layers': expected indices of attention layers"),
    ("dc_layers", [6], "model.dc_layers': expected indices of attention layers"),   # layer 6: MLP only
    ("attn_out_gate_layers", [3, 3], "model.attn_out_gate_layers': expected no repeated layer"),
    ("paired_head_layers", [-1], "model.paired_head_layers': expected indices"),
    ("xsa_layers", [0, 1], r"model.xsa_layers': expected no paired-head layer \(both lists hold \[0\]\)"),
    ("dc_layers", [9], "model.dc_layers': expected no paired-head layer"),
    ("long_window_layers", [3, 5, 10], r"model.key_offset': expected no paired-head layer among .* \[5\]"),
    ("dc_window", 0, "model.dc_window': expected in"),
    ("dc_window", 129, "model.dc_window': expected in"),
])
def test_record89_attention_bad_values_name_the_field(field, value, expected):
    cfg = Config()
    for k, v in R89_ATTENTION.items():
        setattr(cfg.model, k, v)
    setattr(cfg.model, field, value)
    with pytest.raises(ConfigError, match=expected):
        cfg.validate()


def test_paired_heads_need_an_even_head_count():
    cfg = Config()
    cfg.model.num_heads, cfg.model.head_dim, cfg.model.paired_head_layers = 3, 256, [0]
    with pytest.raises(ConfigError, match="model.paired_head_layers': expected an even num_heads"):
        cfg.validate()


# ---- the stage table (schedule.stages) ------------------------------------------------------------

R89_FRAGMENT = __import__("os").path.join(__import__("os").path.dirname(__file__), "fixtures",
                                          "record_89_schedule.json")


def r89_dict() -> dict:
    with open(R89_FRAGMENT) as f:
        return json.load(f)


def test_stage_table_loads_saves_and_derives_the_batches(tmp_path):
    cfg = Config.from_dict(r89_dict()).validate()
    assert [st.tokens_per_step for st in cfg.schedule.stages] == [131072, 262144, 393216, 393216]
    assert cfg.batch_shapes() == [(131072, 16384, 896), (262144, 32768, 2048), (393216, 49152, 2048),
                                  (393216, 49152, 2048)]
    assert cfg.grad_accum(1) == 8 and cfg.grad_accum(8) == 1 and cfg.grad_accum(4) == 2
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    # a stage's 0 takes the train / data field
    cfg.schedule.stages[0].tokens_per_step, cfg.schedule.stages[0].max_doc_len = 0, 0
    cfg.train.tokens_per_step = 65536
    assert cfg.batch_shapes()[0] == (65536, 8192, 2048)


def test_stage_table_from_the_command_line():
    cfg = Config()
    table = json.dumps([{"share": 0.25, "windows": [1, 2]}, {"share": 0.75, "windows": [2, 4], "lr_mul": 2},
                        {"windows": [3, 6]}])
    cfg.override(parse_overrides(["--schedule.stages", table]))
    assert [st.windows for st in cfg.validate().schedule.stages] == [[1, 2], [2, 4], [3, 6]]
    assert cfg.schedule.stages[1].lr_mul == 2.0 and cfg.schedule.stage_bounds() == [0, 546, 2185, 2225]


def test_fixed_micro_batch_with_a_growing_batch():
    """micro_batches_per_step 0: the micro-batch stays train.sequence_tokens, the accumulation grows."""
    data = r89_dict()
    data["train"] = {"micro_batches_per_step": 0, "sequence_tokens": 16384}
    cfg = Config.from_dict(data).validate()
    assert [s.micro_batches for s in cfg.batch_shapes()] == [8, 16, 24, 24]
    assert cfg.grad_accum(8) == 1
    with pytest.raises(ConfigError, match=r"'schedule.stages\[0\].tokens_per_step'.*is 8 micro-batches per "
                                          r"step, not divisible by the world size 16"):
        cfg.grad_accum(16)


def _stages_with(change) -> dict:
    data = r89_dict()
    change(data)
    return data


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["schedule"]["stages"][0].update(share=0.5), "shares of the scheduled stages summing to 1"),
    (lambda d: d["schedule"]["stages"][3].update(share=0.1), "followed by one extension stage"),
    (lambda d: d["schedule"]["stages"].pop(), "followed by one extension stage"),
    (lambda d: d["schedule"]["stages"][1].update(windows=[3]), r"stages\[1\].windows.*\[short, long\]"),
    (lambda d: d["schedule"]["stages"][1].update(windows=[0, 7]), r"stages\[1\].windows.*>= 1"),
    (lambda d: d["schedule"]["stages"][0].update(mtp_weights_end=[1.0, 0.5]),
     r"stages\[0\].mtp_weights_end.*as many weights as mtp_weights_start \(3\)"),
    (lambda d: d["schedule"]["stages"][2].update(tokens_per_step=393217), r"stages\[2\].tokens_per_step.*"
     r"a multiple of 16 \* train.micro_batches_per_step \(128\)"),
    (lambda d: d["schedule"]["stages"][0].update(max_doc_len=1), r"stages\[0\].max_doc_len.*>= 2"),
    (lambda d: d["schedule"]["stages"][1].update(lr_mul=-1), r"stages\[1\].lr_mul"),
    (lambda d: d["schedule"].update(window_stages=[1, 2]), r"schedule.window_stages.*unset"),
    (lambda d: d["schedule"].update(extension_window=9), r"schedule.extension_window.*unset"),
    (lambda d: d["model"].update(rope_max_positions=32768) if "model" in d else d.update(
        model={"rope_max_positions": 32768}), r"stages\[2\].tokens_per_step.*at most model.rope_max_positions"),
    (lambda d: d["schedule"].update(num_scheduled_steps=2, stages=[
        {"share": 0.1, "windows": [1, 1]}, {"share": 0.9, "windows": [1, 1]}, {"windows": [1, 1]}]),
     r"stages\[0\].share.*at least one of the 2 scheduled steps"),
])
def test_stage_table_validation_names_the_field(change, expected):
    with pytest.raises(ConfigError, match=expected):
        Config.from_dict(_stages_with(change)).validate()


def test_stage_table_element_types_name_the_entry():
    data = r89_dict()
    data["schedule"]["stages"][1] = 5
    with pytest.raises(ConfigError, match=r"config field 'schedule.stages\[1\]' must be an object"):
        Config.from_dict(data)
    data["schedule"]["stages"][1] = {"share": 0.5, "windos": [1, 2]}
    with pytest.raises(ConfigError, match=r"unknown config field 'schedule.stages\[1\].windos'"):
        Config.from_dict(data)
    data["schedule"]["stages"][1] = {"share": "half"}
    with pytest.raises(ConfigError, match=r"'schedule.stages\[1\].share': expected float"):
        Config.from_dict(data)


def test_the_gpu_benchmark_config_is_record_124m_on_record_89s_stage_table():
    """benchmarks/r89_stages_r45_model.json (gpu_check.sh stages): record_124m's model and optimizer,
    the fixture's schedule, batch and data parts, next-token loss only (record 45's loss)."""
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    bench = Config.load(f"{root}/benchmarks/r89_stages_r45_model.json").validate()
    r45, r89 = Config.load(config_path("record_124m")), Config.from_dict(r89_dict())
    assert bench.model == r45.model and bench.optim == r45.optim
    assert bench.batch_shapes() == r89.batch_shapes() and bench.train.micro_batches_per_step == 8
    for mine, theirs in zip(bench.schedule.stages, r89.schedule.stages):
        assert (mine.share, mine.windows, mine.lr_mul) == (theirs.share, theirs.windows, theirs.lr_mul)
        assert mine.mtp_weights_start == mine.mtp_weights_end == [1.0] and mine.prefix_weight_start == 0


@pytest.mark.parametrize("name", ["tiny", "record_124m"])
def test_parameter_count_matches_the_model(name):
    """The size check counts parameters from the config alone: it must agree with the model (up to
    the few scalars per layer it leaves out)."""
    import torch

    from speedrun.model import GPT
    cfg = Config.load(config_path(name))
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert 0 <= model.num_params() - cfg.model.parameter_count() <= 8 * cfg.model.num_layers


def test_an_absurd_model_is_refused_before_it_is_allocated():
    cfg = Config()
    cfg.model.model_dim, cfg.model.num_heads = 1 << 20, 8192
    with pytest.raises(ConfigError, match=r"model\.model_dim 1048576, .* make a model of [\d,]+ parameters "
                                          r"needing at least [\d,.]+ GiB, more than the 64\.0 GiB"):
        cfg.model.check_fits(64 * 2**30, 4, "cpu")
    Config().model.check_fits(64 * 2**30, 12, "cpu")   # the record fits


@pytest.mark.parametrize("field, value, expected", [
    ("train.save_every", "-1", "'train.save_every': expected >= 0"),
    ("train.log_every", "0", "'train.log_every': expected >= 1"),
    ("train.val_every", "-5", "'train.val_every': expected >= 0"),
    ("model.num_layers", "0", "'model.num_layers': expected >= 1"),
    ("data.bos_id", "60000", "'data.bos_id': expected a token id below model.vocab_size (50257)"),
])
def test_each_bad_value_names_its_own_field(field, value, expected):
    with pytest.raises(ConfigError) as e:
        Config().override({field: value}).validate()
    assert expected in str(e.value)


def test_compile_dynamic_resolves_from_the_stage_table():
    """auto: symbolic token count only when the micro-batch length changes between stages."""
    r89 = Config.load(config_path("record_89"))
    r45 = Config.load(config_path("record_124m"))
    assert r89.compile_dynamic() and not r45.compile_dynamic()
    r89.train.compile_dynamic, r45.train.compile_dynamic = "off", "on"
    assert not r89.compile_dynamic() and r45.compile_dynamic()
    bad = Config()
    bad.train.compile_dynamic = "sometimes"
    with pytest.raises(ConfigError, match="train.compile_dynamic"):
        bad.validate()
