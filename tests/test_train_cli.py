"""`speedrun train` as a careless user drives it: onto an existing run, resumed with or without its
flags, with another recipe, failing at the start. Every bad case exits 1 with one line (no
traceback) and leaves the run's files as they were."""
import json
import os

import pytest
from test_train import micro_config, train_losses, write_synthetic_shards

from speedrun.cli import main


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A micro recipe file (20 scheduled steps) on synthetic shards; runs stop early with max_steps."""
    d = tmp_path_factory.mktemp("recipe")
    cfg = micro_config(*write_synthetic_shards(str(d), num_tokens=30000), "", steps=20)
    path = d / "micro.json"
    cfg.save(str(path))
    return str(path)


def snapshot(run_dir) -> dict:
    """Every file under the run directory with its bytes."""
    out = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = f.read()
    return out


def train(*argv) -> int:
    return main(["train", *map(str, argv)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_an_existing_run_is_refused_then_overwritten_on_request(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--config", recipe, "--train.max_steps", 2, "--save-path", run) == 0
    before = snapshot(run)
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert train("--config", recipe, "--train.max_steps", 3, "--save-path", run) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"speedrun train: error: --save-path {run}: already holds a run (config.json")
    assert f"--resume {run}" in line and "--overwrite" in line
    assert snapshot(run) == {**before, "notes.txt": b"mine"}
    assert train("--config", recipe, "--train.max_steps", 3, "--save-path", run, "--overwrite") == 0
    train_steps, _ = train_losses(run)
    assert sorted(train_steps) == [1, 2, 3]            # a fresh run: nothing appended to the old one
    assert (run / "notes.txt").read_text() == "mine"   # only the run's own files were replaced
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000003"]


def test_resume_restores_the_runs_own_settings(recipe, tmp_path, capsys):
    """Started with overrides, resumed with only a new max_steps: the overrides hold, the new value is
    recorded, metrics have each step once with a mark, and the result is the uninterrupted run's."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    flags = ["--config", recipe, "--save-every", 2, "--train.val_every", 2]
    assert train(*flags, "--train.max_steps", 6, "--save-path", straight) == 0
    assert train(*flags, "--train.max_steps", 4, "--save-path", run) == 0
    assert train("--resume", run, "--train.max_steps", 6) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["train"]["save_every"], config["train"]["val_every"], config["train"]["max_steps"]) == (2, 2, 6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4, 6]
    marks = [r["resume"] for r in records if "resume" in r]
    assert len(marks) == 1 and marks[0]["step"] == 4 and marks[0]["changed"] == {"train.max_steps": [4, 6]}
    assert sum("summary" in r for r in records) == 1
    assert train_losses(run) == train_losses(straight)
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000002", "step_000004", "step_000006"]


@pytest.mark.parametrize("flags, field", [
    (["--optim.muon.lr", "0.01"], "'optim.muon.lr' is 0.03 in the checkpoint but 0.01 here"),
    (["--config", "tiny"], "'model.num_layers' is 3 in the checkpoint but 4 here (and 22 more: model.model_dim"),
    (["--seed", "5"], "'train.seed' is 0 in the checkpoint but 5 here"),
    (["--train.max_steps", "1"], "'train.max_steps' is 1, below the checkpoint's step 2"),
])
def test_resume_refuses_a_change_of_recipe(recipe, tmp_path, capsys, flags, field):
    run = tmp_path / "run"
    assert train("--config", recipe, "--train.max_steps", 2, "--save-path", run) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert train("--resume", run, *flags) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"speedrun train: error: --resume {run}: config field {field}"), line
    assert snapshot(run) == before


def test_a_failed_start_leaves_no_run_folder(recipe, tmp_path, capsys, monkeypatch):
    from speedrun.train.trainer import Trainer

    def broken_warmup(self):
        raise RuntimeError("compiler not found")
    monkeypatch.setattr(Trainer, "warmup", broken_warmup)
    run = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="compiler not found"):
        train("--config", recipe, "--train.max_steps", 2, "--save-path", run)
    assert not os.path.exists(run) and os.listdir(tmp_path) == []
    # in a folder that was there before, only the run's own files go
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="compiler not found"):
        train("--config", recipe, "--train.max_steps", 2, "--save-path", run)
    assert os.listdir(run) == ["notes.txt"]


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("damage, message", [
    ("model.safetensors", r"model\.safetensors: \d+ bytes, but \d+ were written \(meta\.json\); the file is truncated"),
    ("optim_rank0.pt", r"optim_rank0\.pt: holds Python objects other than tensors and plain containers; refused"),
    ("grads_rank0.pt", r"grads_rank0\.pt: is listed in meta\.json but missing; this checkpoint is incomplete"),
])
def test_resume_of_a_damaged_checkpoint_is_one_line(recipe, tmp_path, capsys, damage, message):
    import pickle
    import re
    run = tmp_path / "run"
    assert train("--config", recipe, "--train.max_steps", 2, "--save-path", run) == 0
    ckpt = run / "checkpoints" / "step_000002"
    target = ckpt / damage
    if damage == "model.safetensors":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "optim_rank0.pt":   # a pickle that would run code, with the manifest to match
        target.write_bytes(pickle.dumps(RunsCode()))
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"][damage] = target.stat().st_size
        (ckpt / "meta.json").write_text(json.dumps(meta))
    else:
        target.unlink()
    before = snapshot(run)
    capsys.readouterr()
    assert train("--resume", run, "--train.max_steps", 4) == 1
    assert re.search(message, one_line_error(capsys))
    assert snapshot(run) == before


def test_token_ids_outside_the_vocabulary_fail_when_the_shard_is_opened(recipe, tmp_path, capsys):
    """A shard made with another tokenizer (ids >= model.vocab_size): one line naming the shard and
    the id, before any training step, and no run folder left behind."""
    import numpy as np

    from speedrun.data.shards import write_shard
    tokens = np.random.default_rng(0).integers(0, 255, 30000).astype(np.uint16)
    tokens[::100] = 255                         # the micro recipe's BOS
    tokens[12345] = 300                         # one id past the 256-token vocabulary
    write_shard(tmp_path / "other_train_000001.bin", tokens)
    run = tmp_path / "run"
    assert train("--config", recipe, "--data-path", tmp_path / "other_train_*.bin", "--save-path", run) == 1
    line = one_line_error(capsys)
    assert line == (f"speedrun train: error: {tmp_path / 'other_train_000001.bin'}: token id 300 (first at "
                    f"position 12345) is outside the model's vocabulary, model.vocab_size 256 (ids 0..255); "
                    f"were these shards made with another tokenizer?")
    assert not run.exists()


def test_a_lazy_compile_reports_the_first_step(recipe, tmp_path, capsys, monkeypatch):
    """With train.warmup_compile off, torch.compile compiles during the first step: the run reports
    that step's time, not a near-zero warm-up. (The compile is simulated by a slow first step: a
    real one takes a minute on a CPU.)"""
    import time

    from speedrun.model.gpt import GPT
    from speedrun.train.trainer import Trainer
    monkeypatch.setattr(GPT, "compile_regions", lambda self, **kw: self)
    step = Trainer.train_step

    def slow_first(self, i, batches, mark=None):
        if i == 0:
            time.sleep(0.5)
        return step(self, i, batches, mark)
    monkeypatch.setattr(Trainer, "train_step", slow_first)
    run = tmp_path / "run"
    assert train("--config", recipe, "--train.max_steps", 2, "--train.compile", "true",
                 "--train.warmup_compile", "false", "--save-path", run) == 0
    out = capsys.readouterr().out
    assert "compile + warm-up" not in out
    first = float(out.split("first step ")[1].split(" s (torch.compile compiled the training graphs")[0])
    assert first >= 0.5
    assert ", of which the first step (compiling)" in out
    assert json.loads((run / "summary.json").read_text())["first_step_s"] == pytest.approx(first, abs=0.06)


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "-1"], "config field 'train.save_every': expected >= 0 (0 = only at the end)"),
    (["--train.log_every", "0"], "config field 'train.log_every': expected >= 1"),
])
def test_a_bad_setting_names_its_own_field(recipe, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert train("--config", recipe, "--save-path", run, *flags) == 1
    assert one_line_error(capsys) == f"speedrun train: error: {message}"
    assert not run.exists()
