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
