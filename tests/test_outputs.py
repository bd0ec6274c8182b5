"""Outputs that cannot be written (a file in the way, no permission, a full disk) for train, export
and data text: exit 1, one line naming the path and what to do, no traceback, nothing half-written,
and a run that resumes once there is room again."""
import errno
import os

import pytest
from test_train import micro_config, train_losses, write_synthetic_shards

from speedrun.cli import main


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    cfg = micro_config(*write_synthetic_shards(str(d), num_tokens=30000), "", steps=20)
    cfg.save(str(d / "micro.json"))
    return str(d / "micro.json")


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--config", recipe, "--train.max_steps", "2", "--save-path", str(run)]) == 0
    return str(run)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[-1]


def disk_full_for(monkeypatch, match):
    """fsync (where a full disk shows at the latest) fails for files whose path contains ``match``."""
    real = os.fsync

    def fsync(fd):
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_file_in_the_way(recipe, trained, text, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    hint = "Not a directory (a file is in the way: a folder of this path is a file)"
    cases = [(["train", "--config", recipe, "--save-path", f"{blocker}/run"], f"speedrun train: error: {blocker}/run: {hint}"),
             (["export", "--checkpoint", trained, "--out", f"{blocker}/x"], f"speedrun export: error: {blocker}/x: {hint}"),
             (["data", "text", text, "--out", f"{blocker}/x"], f"speedrun data: error: {blocker}/x: {hint}"),
             (["data", "text", text, "--out", str(blocker)],
              f"speedrun data: error: --out {blocker}: is a file, expected a directory for the shards")]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert one_line_error(capsys) == message
    assert blocker.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["corpus.txt", "file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_no_permission(recipe, text, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["train", "--config", recipe, "--save-path", str(locked / "run")]) == 1
    assert "Permission denied (no permission" in one_line_error(capsys)
    assert main(["data", "text", text, "--out", str(locked)]) == 1
    assert "Permission denied" in one_line_error(capsys)
    assert os.listdir(locked) == []


def test_a_full_disk_at_the_start_of_a_run(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    disk_full_for(monkeypatch, "config.json")
    assert main(["train", "--config", recipe, "--train.max_steps", "2", "--save-path", str(run)]) == 1
    assert one_line_error(capsys) == (f"speedrun train: error: {run}/config.json: No space left on device "
                                      f"(the disk is full: free space or write somewhere else)")
    assert not run.exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(recipe, tmp_path, capsys, monkeypatch):
    """The save of step 4 fails: one line naming the file; step 2 stays the latest, complete; once
    there is room the run resumes and ends where an uninterrupted run ends."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    flags = ["train", "--config", recipe, "--train.max_steps", "6", "--save-every", "2"]
    assert main(flags + ["--save-path", str(straight)]) == 0
    disk_full_for(monkeypatch, "step_000004")
    assert main(flags + ["--save-path", str(run)]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"speedrun train: error: {run}/checkpoints/step_000004.incomplete/")
    assert line.endswith(": No space left on device (the disk is full: free space or write somewhere else)")
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000002"]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert train_losses(run) == train_losses(straight)


def test_a_full_disk_in_export_and_data_text(trained, text, tmp_path, capsys, monkeypatch):
    disk_full_for(monkeypatch, "model.safetensors")
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", trained, "--out", str(out)]) == 1
    line = one_line_error(capsys)
    assert line.startswith("speedrun export: error: ") and "model.safetensors: No space left on device" in line
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]          # no export, no staging folder
    monkeypatch.undo()
    disk_full_for(monkeypatch, "_train_000001.bin")
    shards = tmp_path / "shards"
    assert main(["data", "text", text, "--out", str(shards), "--quiet"]) == 1
    assert one_line_error(capsys) == (f"speedrun data: error: {shards}/corpus_train_000001.bin: No space left on "
                                      f"device (the disk is full: free space or write somewhere else)")
    assert os.listdir(shards) == []     # the val shard written before the failure is gone too
