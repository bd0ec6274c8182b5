"""``configs/record_89.json``: the whole record-89 recipe loads and validates; its model is the
record-89 model of every merged piece (the parameter inventory equals the public code's table); the
compressed "mini" run's overrides keep the stage shares, the untie follows the stages; an end-to-end
``speedrun train`` of a shrunk record_89 with every switch on (slow)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from speedrun.config import Config, ConfigError
from speedrun.model import GPT
from speedrun.optim.build import build_optimizers
from speedrun.optim.schedules import LossTerms, loss_terms, stage_spans, window_blocks
from speedrun.presets import record89_model
from speedrun.train.cli import build_config, config_path

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "record_89_schedule.json")
MINI = ["--schedule.num_scheduled_steps", "120", "--schedule.num_extension_steps", "5",
        "--train.val_tokens", "4194304", "--train.val_every", "40"]


def load() -> Config:
    return Config.load(config_path("record_89")).validate()


def _args(argv):
    import argparse

    from speedrun.train.cli import add_train_arguments
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args, extra = p.parse_known_args(argv)
    args.overrides = extra
    return args


def test_record_89_is_every_merged_piece():
    cfg = load()
    m, o = cfg.model, cfg.optim
    # the model: record89_model (embeddings / residual stream / attention coefficients) with the
    # attention internals, FP8 MLP + head, the asymmetric rescale, tied until stage 2
    want = record89_model(paired_head_layers=[0, 2, 5, 9], key_offset=True, fp8_mlp=True, untie_after_step=-1,
                          untie_at_stage=2, fp8_head_scales=[100 / 448, 1.6 / 448, 0.75 / 448])
    assert m == want
    assert (m.xsa_layers, m.dc_layers, m.attn_out_gate_layers, m.attn_lambdas) == ([1, 3, 4, 7], [10], [3, 10], True)
    assert not m.attn_gate and not m.block_lambdas and m.fp8_head and m.fp8_mlp
    assert (m.logit_softcap, m.logit_softcap_offset, m.logit_softcap_temperature) == (23.0, 5.0, 7.5)
    # the optimizers: r89-training.md 5
    assert (o.muon.lr, o.muon.beta2, o.muon.axis, o.muon.qk_head_pairs, o.muon.bf16_weights) == \
        (0.023, 0.9, "matrix", True, True)
    assert (o.muon.c_fc_lr_mul, o.muon.c_proj_lr_mul, o.muon.weight_decay) == (2.0, 4.0, 1.2)
    assert (o.adam.lr, o.adam.eps, o.adam.weight_decay, o.adam.cautious_weight_decay) == (0.008, 1e-10, 0.005, True)
    assert (o.adam.decay_form, o.adam.state_dtype, o.smear_gate_optimizer) == ("lr_squared", "float32", "adam")
    # the schedule, batch and data parts are the fixture's (checked value by value in test_optim_schedules)
    with open(FIXTURE) as f:
        fixture = Config.from_dict(json.load(f))
    assert cfg.schedule == fixture.schedule and cfg.batch_shapes() == fixture.batch_shapes()
    assert (cfg.data.max_num_docs_rule, cfg.train.micro_batches_per_step) == ("tight", 8)
    assert (cfg.train.val_every, cfg.train.val_tokens) == (250, 10485760)
    assert cfg.untie_step() == 847 and loss_terms(cfg.schedule) == LossTerms(3, True)


def test_record_89_inventory_is_the_public_table():
    """tests/test_model_r89.py's table of the public code's parameters, with the json's model and
    optimizer (groups, betas, multipliers; 635,885,383 parameters without the public padding)."""
    import test_model_r89 as T
    cfg = load()
    with torch.device("meta"):
        model = GPT(cfg.model, torch.bfloat16, matrix_dtype=torch.bfloat16, prefix_loss=True)
    ours = dict(model.named_parameters())
    for name, shape, which, betas, lr_mul, wd_mul in T.PUBLIC:
        names, unused, _ = T.MAPPING[name]
        if name not in ("qk_bank", "vo_bank"):
            assert sum(ours[n].numel() for n in names) == math.prod(shape) - T.BANK_PADDING.get(name, 0) - unused
        for n in names:
            assert T.optimizer_of(ours[n].label, cfg.optim) == which, (name, n)
            if which == "adam":
                g = T.adam_group(ours[n].label, cfg.optim)
                assert (g["betas"], g["lr_mul"], g["wd_mul"]) == (betas, lr_mul, wd_mul), (name, n)
    assert model.num_params() == 635_885_383
    assert {p.dtype for n, p in ours.items() if p.label in ("attn", "mlp_fc", "mlp_proj")} == {torch.bfloat16}
    optimizers = build_optimizers(model, cfg.optim)
    assert optimizers.adam.decay_form == "lr_squared" and optimizers.adam.state_dtype == torch.float32


def test_the_mini_run_overrides():
    """120 + 5 steps: stage shares kept (bounds round(k/3 * 120)), momentum step counts unchanged
    (warm-up 300 > 125: it never reaches 0.95), the untie at the first odd step of stage 2."""
    cfg = build_config(_args(["--config", "record_89", *MINI]))
    s = cfg.schedule
    assert s.stage_bounds() == [0, 40, 80, 120, 125]
    assert [(sp.start, sp.end) for sp in stage_spans(s)] == [(0, 40), (40, 80), (80, 120), (120, 125)]
    assert window_blocks(79, s) == (3, 7) and window_blocks(80, s) == (5, 11) and window_blocks(124, s) == (6, 13)
    assert cfg.untie_step() == 81 and cfg.embed_tied_at(81) and not cfg.embed_tied_at(82)
    assert (cfg.optim.muon.momentum_warmup_steps, cfg.optim.muon.momentum_cooldown_steps) == (300, 50)
    assert (cfg.train.val_tokens, cfg.train.val_every) == (4194304, 40)
    assert cfg.train.val_tokens % cfg.train.val_sequence_tokens == 0


def test_no_fp8_turns_off_the_fp8_head_and_mlp():
    cfg = build_config(_args(["--config", "record_89", "--no-fp8"]))
    assert not cfg.model.fp8_head and not cfg.model.fp8_mlp
    cfg = build_config(_args(["--config", "record_89", "--model.fp8_mlp", "false"]))   # the public DISABLE_FP8
    assert cfg.model.fp8_head and not cfg.model.fp8_mlp


@pytest.mark.parametrize("change,field", [
    ({"model.untie_at_stage": "3"}, "model.untie_at_stage"),            # the extension stage
    ({"model.untie_at_stage": "-2"}, "model.untie_at_stage"),
    ({"model.untie_after_step": "847"}, "model.untie_at_stage"),        # two untie points
    ({"model.fp8_head_scales": "[1.0, 2.0]"}, "model.fp8_head_scales"),
    ({"model.fp8_head_scales": "[1.0, 0.0, 2.0]"}, "model.fp8_head_scales"),
    ({"optim.adam.decay_form": "squared"}, "optim.adam.decay_form"),
])
def test_bad_values_name_the_field(change, field):
    cfg = Config.load(config_path("record_89"))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.override(change).validate()


def test_untie_at_stage_needs_a_stage_table():
    cfg = Config()
    cfg.model.tie_embed, cfg.model.head_init_std, cfg.model.untie_at_stage = True, 0.01, 1
    with pytest.raises(ConfigError, match="model.untie_at_stage"):
        cfg.validate()


# ------------------------------------------------------------------------------------------------
# a shrunk record_89 through `speedrun train` (every switch on)
# ------------------------------------------------------------------------------------------------
BOS = 1000


def write_multibyte_shards(directory, num_tokens=40000, seed=0):
    """A Markov stream over GPT-2 ids 256..999 (merges, most with a prefix token inside a 1024-token
    vocabulary, so the prefix term counts) with BOS = 1000."""
    from speedrun.data.shards import write_shard
    rng = np.random.default_rng(seed)
    successors = rng.integers(256, BOS, size=(BOS, 4))
    tokens, current = [BOS], 300
    while len(tokens) < num_tokens:
        if rng.random() < 0.01:
            tokens.append(BOS)
            current = int(rng.integers(256, BOS))
        current = int(successors[current, rng.integers(0, 4)])
        tokens.append(current)
    tokens = np.array(tokens, dtype=np.uint16)
    write_shard(os.path.join(directory, "mb_val_000000.bin"), tokens[:8192])
    write_shard(os.path.join(directory, "mb_train_000001.bin"), tokens[8192:])
    return os.path.join(directory, "mb_train_*.bin"), os.path.join(directory, "mb_val_*.bin")


def shrunk_overrides(scheduled_steps=3) -> list[str]:
    """Record 89 at toy size: 11 layers (every layer list as the record's), 64 wide, 4 heads of 16,
    a 1024-token vocabulary, the bigram table and windows scaled down; the stage table's batches
    512 / 1024 / 1536 tokens (8 micro-batches of 64 / 128 / 192), its weights and lr multipliers
    as the record's."""
    stages = json.loads(json.dumps(Config.load(config_path("record_89")).to_dict()["schedule"]["stages"]))
    for st, (tokens, cap) in zip(stages, ((512, 32), (1024, 64), (1536, 64), (1536, 64))):
        st["tokens_per_step"], st["max_doc_len"] = tokens, cap
    return ["--model.vocab_size", "1024", "--model.model_dim", "64", "--model.num_heads", "4",
            "--model.head_dim", "16", "--model.bigram_vocab_size", "997", "--model.bigram_sign_rows", "64",
            "--model.block_size", "16", "--model.rope_max_positions", "4096", "--model.attention_backend", "sdpa",
            "--schedule.num_scheduled_steps", str(scheduled_steps), "--schedule.num_extension_steps", "1",
            "--schedule.stages", json.dumps(stages), "--data.bos_id", str(BOS), "--data.max_doc_len", "64",
            "--train.val_tokens", "1024", "--train.val_sequence_tokens", "512", "--train.val_every", "0",
            "--optim.muon.kernel", "torch"]


@pytest.mark.slow
def test_shrunk_record_89_trains_end_to_end(tmp_path):
    from speedrun.cli import main
    train, val = write_multibyte_shards(str(tmp_path))
    run = tmp_path / "run"
    rc = main(["train", "--config", "record_89", "--cpu", "--no-compile", "--data-path", train,
               "--val-data-path", val, "--save-path", str(run), *shrunk_overrides()])
    assert rc == 0
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_loss = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    val_loss = [r["val_loss"] for r in records if "val_loss" in r]
    assert sorted(train_loss) == [1, 2, 3, 4] and all(math.isfinite(v) for v in train_loss.values())
    assert math.isfinite(val_loss[-1]) and val_loss[-1] < val_loss[0]
    # the weighted objective in stage 0 (~2x the next-token loss), next token only from stage 2
    assert train_loss[1] > 1.6 * train_loss[4]
    saved = Config.load(str(run / "config.json"))
    assert saved.untie_step() == 3 and saved.model.fp8_mlp and saved.optim.adam.decay_form == "lr_squared"


@pytest.mark.slow
def test_bench_of_a_shrunk_record_89(tmp_path):
    """`speedrun bench --config record_89` on the CPU at toy size (eager: inductor's or even AOT
    autograd's tracing of every record-89 region on the CPU takes minutes; the compiled loss with
    its weights is tests/test_model_loss_terms.py's): a row per stage with the stage's batch, finite
    losses, every step with its own MTP / prefix weights (the bench runs past the untie at step 3)."""
    from speedrun.cli import main
    out = tmp_path / "bench.json"
    overrides = [a for a in shrunk_overrides(3) if a not in ("--data.bos_id", str(BOS))]
    assert main(["bench", "--config", "record_89", "--cpu", "--no-compile", "--steps", "1", "--skip-steps", "0",
                 "--save-path", str(tmp_path / "run"), "--out", str(out), "--data.bos_id", "1023",
                 *overrides]) == 0
    result = json.loads(out.read_text())
    rows = result["stages"]
    assert [(r["stage"], r["tokens_per_step"], r["micro_batch_tokens"], r["grad_accum"]) for r in rows] == [
        (0, 512, 64, 8), (1, 1024, 128, 8), (2, 1536, 192, 8), (3, 1536, 192, 8)]
    assert all(math.isfinite(r["train_loss"]) and r["ms_per_step"] > 0 for r in rows)
    assert rows[0]["train_loss"] > 1.6 * rows[3]["train_loss"]     # stage 0's weighted objective


@pytest.mark.parametrize("field, value", [("bigram_vocab_size", 1), ("xsa_layers", [99])])
def test_model_checks_of_record89_name_the_file_they_came_from(field, value):
    """An export's config.json is checked by ModelConfig.validate(source): the record-89 checks (and
    the per-layer attention lists) prefix their messages with that file too."""
    m = record89_model()
    setattr(m, field, value)
    with pytest.raises(ConfigError, match=rf"^export/config\.json: config field 'model\.{field}'"):
        m.validate("export/config.json")
