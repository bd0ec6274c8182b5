"""Trainer behaviour on CPU: exact resume, 1 process == 2 processes, guards, CLI end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from speedrun.config import Config
from speedrun.distributed import init_world
from speedrun.utils import current_umask

VOCAB, BOS = 256, 255


def write_synthetic_shards(directory, num_tokens=60000, seed=0):
    """A learnable stream: documents drawn from a fixed Markov chain where each token has 4 likely
    successors (conditional entropy ~1.4 nats against 5.5 for a uniform guess)."""
    from speedrun.data.shards import write_shard
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, BOS, size=(BOS, 4))
    tokens, current = [], 0
    while len(tokens) < num_tokens:
        if rng.random() < 0.01:
            tokens.append(BOS)
            current = int(rng.integers(0, BOS))
        current = int(successors[current, rng.integers(0, 4)])
        tokens.append(current)
    tokens = np.array(tokens[:num_tokens], dtype=np.uint16)
    tokens[0] = BOS
    write_shard(os.path.join(directory, "syn_val_000000.bin"), tokens[:4096])
    write_shard(os.path.join(directory, "syn_train_000001.bin"), tokens[4096:])
    return os.path.join(directory, "syn_train_*.bin"), os.path.join(directory, "syn_val_*.bin")


def micro_config(train_glob, val_glob, save_path, steps=8) -> Config:
    cfg = Config()
    cfg.model.vocab_size = VOCAB
    cfg.model.num_layers, cfg.model.model_dim, cfg.model.num_heads, cfg.model.head_dim = 3, 64, 2, 32
    cfg.model.no_attention_layers, cfg.model.long_window_layers = [1], [2]
    cfg.model.value_embed_layers = [0, -1, 0]
    cfg.model.skip_from_layer, cfg.model.skip_to_layer, cfg.model.backout_layer = 0, 2, 1
    cfg.model.rope_max_positions = 1024
    cfg.model.block_size = 16
    cfg.schedule.num_scheduled_steps, cfg.schedule.num_extension_steps = steps - 2, 2
    cfg.schedule.window_stages, cfg.schedule.extension_window, cfg.schedule.final_val_window = [2, 4], 6, 8
    cfg.data.train_path, cfg.data.val_path, cfg.data.bos_id, cfg.data.max_doc_len = train_glob, val_glob, BOS, 128
    cfg.train.tokens_per_step, cfg.train.sequence_tokens = 512, 256
    cfg.train.val_tokens, cfg.train.val_sequence_tokens, cfg.train.val_every = 1024, 256, 4
    cfg.train.save_path, cfg.train.device, cfg.train.compile = str(save_path), "cpu", False
    return cfg.validate()


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r["train_loss"] for r in records if "train_loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


def run_trainer(cfg, resume=None):
    from speedrun.train.trainer import Trainer
    world = init_world("cpu")
    trainer = Trainer(cfg, world, cfg.train.save_path, resume=resume)
    return trainer.run()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    cfg = micro_config(*shards, run_dir)
    cfg.train.save_every = 3
    summary = run_trainer(cfg)
    return run_dir, summary


def test_run_learns_and_writes_its_outputs(full_run):
    run_dir, summary = full_run
    train, val = train_losses(run_dir)
    assert sorted(train) == list(range(1, 9))
    assert val[8] < val[0] - 0.3, val  # the Markov stream is easy: val loss must fall clearly
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/latest",
                 "checkpoints/step_000003/model.safetensors", "checkpoints/step_000008/meta.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    weights = os.path.join(run_dir, "checkpoints/step_000008/model.safetensors")
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~current_umask()  # a normal file, not 0600
    assert summary.final_val_loss == pytest.approx(val[8])
    assert summary.val_unigram_entropy > 0


def test_resume_continues_exactly(full_run, shards, tmp_path):
    """Stop after step 3 (an odd checkpoint: Adam holds the gradients of step 2), resume, same losses."""
    run_dir, _ = full_run
    cfg = micro_config(*shards, tmp_path)
    run_trainer(cfg, resume=os.path.join(run_dir, "checkpoints", "step_000003"))
    full_train, full_val = train_losses(run_dir)
    resumed_train, resumed_val = train_losses(tmp_path)
    # the continued run's metrics start with the original run's up to the checkpoint
    assert sorted(resumed_train) == list(range(1, 9))
    for step, loss in resumed_train.items():
        assert loss == pytest.approx(full_train[step], rel=1e-6, abs=1e-6), step
    assert resumed_val[8] == pytest.approx(full_val[8], rel=1e-6)


def test_resume_refuses_another_world_size(full_run, shards, tmp_path):
    from speedrun.train.checkpoint import CheckpointError
    run_dir, _ = full_run
    meta_path = os.path.join(run_dir, "checkpoints", "step_000003", "meta.json")
    meta = json.load(open(meta_path))
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "meta.json").write_text(json.dumps({**meta, "world_size": 8}))
    with pytest.raises(CheckpointError, match="saved with world size 8"):
        run_trainer(micro_config(*shards, tmp_path / "run"), resume=str(fake))


def test_nan_loss_stops_naming_the_step(shards, tmp_path, monkeypatch):
    from speedrun.train.trainer import Trainer, TrainingError
    cfg = micro_config(*shards, tmp_path)
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    real_step = trainer.train_step

    def poisoned(step, batches):
        loss = real_step(step, batches)
        return loss * float("nan") if step == 2 else loss
    monkeypatch.setattr(trainer, "train_step", poisoned)
    with pytest.raises(TrainingError, match="training loss is nan at step 2"):
        trainer.run()


def test_logged_step_time_is_training_time(shards, tmp_path, monkeypatch):
    """ms_per_step (and tokens/s) of a logged step counts training time only: the step right after
    a validation does not carry the validation's time (a slow one here: +1 s each)."""
    from speedrun.train.trainer import Trainer
    cfg = micro_config(*shards, tmp_path)
    cfg.train.log_every = 1
    real = Trainer.validate

    def slow_validate(self):
        time.sleep(1.0)
        return real(self)
    monkeypatch.setattr(Trainer, "validate", slow_validate)
    run_trainer(cfg)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        logs = [r for r in map(json.loads, f) if "ms_per_step" in r]
    assert [r["step"] for r in logs] == list(range(1, 9))
    assert max(r["ms_per_step"] for r in logs) < 1000, [r["ms_per_step"] for r in logs]   # step 5 follows a validation
    assert sum(r["ms_per_step"] for r in logs) == pytest.approx(logs[-1]["train_time_ms"], rel=1e-9)
    for r in logs:
        assert r["tokens_per_s"] == pytest.approx(cfg.train.tokens_per_step / (r["ms_per_step"] / 1e3))


def test_missing_data_fails_before_building_anything(tmp_path):
    from speedrun.data.shards import ShardError
    from speedrun.train.trainer import Trainer
    cfg = micro_config(str(tmp_path / "nothing_*.bin"), str(tmp_path / "nothing_val.bin"), tmp_path)
    with pytest.raises(ShardError, match="nothing_"):
        Trainer(cfg, init_world("cpu"), str(tmp_path))


def _cli_env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli_args(shards, save_path, extra=()):
    cfg = micro_config(*shards, save_path)
    config_file = os.path.join(str(save_path) + "-config.json")
    cfg.save(config_file)
    return [sys.executable, "-m", "speedrun", "train", "--config", config_file, "--cpu", *extra]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(shards, full_run, tmp_path):
    """--num-gpus 2 on CPU launches 2 gloo workers through torch's launcher; same losses as 1 process."""
    run_dir, _ = full_run
    proc = subprocess.run(_cli_args(shards, tmp_path / "two", ["--num-gpus", "2"]), env=_cli_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_train, one_val = train_losses(run_dir)
    two_train, two_val = train_losses(tmp_path / "two")
    assert sorted(two_train) == sorted(one_train)
    for step in one_train:
        assert two_train[step] == pytest.approx(one_train[step], rel=2e-4, abs=2e-4), step
    assert two_val[8] == pytest.approx(one_val[8], rel=2e-4)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_then_exits(shards, tmp_path):
    args = _cli_args(shards, tmp_path / "run", ["--schedule.num_scheduled_steps", "400"])
    proc = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step") and "loss" in line and "val" not in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(seen)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + out
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and "saved" in out


def test_max_steps_runs_a_prefix_of_the_recipe(full_run, shards, tmp_path):
    """train.max_steps stops early with the full recipe's schedules: the losses are the full run's."""
    run_dir, _ = full_run
    cfg = micro_config(*shards, tmp_path)
    cfg.train.max_steps = 5
    summary = run_trainer(cfg)
    full_train, _ = train_losses(run_dir)
    short_train, short_val = train_losses(tmp_path)
    assert sorted(short_train) == [1, 2, 3, 4, 5]
    for step, loss in short_train.items():
        assert loss == pytest.approx(full_train[step], rel=1e-6, abs=1e-6), step
    assert 5 in short_val and summary.steps == 5
    assert os.path.exists(os.path.join(tmp_path, "checkpoints", "step_000005", "meta.json"))


def test_flash_attention_on_cpu_is_a_one_line_error(shards, tmp_path, capsys):
    from speedrun.cli import main
    cfg = micro_config(*shards, tmp_path / "run")
    config_file = tmp_path / "micro.json"
    cfg.save(str(config_file))
    assert main(["train", "--config", str(config_file), "--cpu", "--use-flash-attn"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA device" in err[0] and "--use-flash-attn" in err[0], err


def test_warmup_compiles_everything_once(shards, tmp_path, monkeypatch):
    """After the warm-up (first window stage only, for flex/sdpa), no later window stage, Adam step
    kind, validation or the final validation window triggers another dynamo compile: windows and
    YaRN state are tensors, so the warm-up's graphs serve the whole run."""
    from torch._dynamo.utils import counters

    from speedrun.model.gpt import GPT
    from speedrun.optim.schedules import final_window_blocks, window_stages
    from speedrun.train.trainer import Trainer
    original = GPT.compile_regions
    # the eager backend: dynamo's tracing and guards (what decides recompiles), no codegen
    monkeypatch.setattr(GPT, "compile_regions", lambda self, **kw: original(self, backend="eager", **kw))
    torch._dynamo.reset()
    cfg = micro_config(*shards, tmp_path)
    cfg.train.compile = True
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    trainer.warmup()
    assert set(k for k in trainer.warmup_phases if k.startswith("step")) >= {"step0_forward", "step1"}
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    stages = window_stages(cfg.schedule)
    assert len(stages) >= 3
    for first, _ in stages.values():
        trainer.apply_window(first)
        for k in range(2):
            trainer.train_step(first + k, trainer.loader.next_step())
        trainer.validate()
    trainer.model.set_window(final_window_blocks(cfg.schedule), update_yarn=False)
    trainer.validate()
    trainer.loader.close()
    assert counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


def test_parallel_warmup_helper_runs_alone(shards, tmp_path, monkeypatch):
    """The warm-up helper process: gets the run's config, ignores torchrun's variables (runs as a
    single process), takes an optimizer step and evaluates, then exits cleanly."""
    from speedrun.train.precompile import Precompile
    cfg = micro_config(*shards, tmp_path)
    monkeypatch.setenv("RANK", "1")            # as under torchrun: must not reach the helper
    monkeypatch.setenv("WORLD_SIZE", "2")
    helper = Precompile(cfg, "cpu")
    helper.proc.wait(timeout=120)
    log = helper.tail()
    assert helper.settle() == "finished", log
    loss = float(log.split("eval loss")[1].split()[0])
    assert 0 < loss < 6.0  # an untrained model on a 256-token vocabulary: ~ln(256) = 5.5


def test_parallel_warmup_helper_still_running_is_stopped(shards, tmp_path):
    """A helper that has not finished when the trainer needs its graphs is stopped (the trainer
    then compiles or loads them itself) instead of being waited for."""
    from speedrun.train.precompile import Precompile
    helper = Precompile(micro_config(*shards, tmp_path), "cpu")
    assert helper.settle() == "stopped"   # just started: still importing torch
    assert helper.proc.poll() is not None
